"""MAny — Merge Anything for multimodal continual instruction tuning (arXiv 2604.14016).

The method only: LPM (`many.lpm`), CPM (`many.cpm`), merge baselines (`many.merging`), metrics,
the model, data and training code. Nothing here imports prefect, ray or fsspec.
"""

__version__ = "0.1.0"
