"""MAny — Merge Anything for multimodal continual instruction tuning (arXiv 2604.14016).

The method only: LPM (`many.lpm`), CPM (`many.cpm`), merge baselines (`many.merging`), metrics,
the model, data and training code. Nothing here imports tasks, flows, prefect, ray, fsspec or s3fs,
and its modules import one another in no cycle (tests/test_layering.py).

`many.load(export_dir)` is the continual model of an export, ready to answer (`many.inference`); it is imported
on first use, so `import many` stays cheap (no torch).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from many.inference import load

        return load
    raise AttributeError(f"module 'many' has no attribute {name!r}")
