"""MAny — Merge Anything for multimodal continual instruction tuning (arXiv 2604.14016).

The method only: LPM (`many.lpm`), CPM (`many.cpm`), merge baselines (`many.merging`), metrics,
the model, data and training code. Nothing here imports tasks, flows, prefect, ray, fsspec or s3fs,
and its modules import one another in no cycle (tests/test_layering.py).
"""

__version__ = "0.1.0"
