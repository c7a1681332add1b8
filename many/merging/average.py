"""Average merging: the plain mean of the tasks' updates (docs/design.md §1, comparison methods).

    M = (1/T) Σ_i ΔW_i

The simplest model-soup baseline (Wortsman et al. 2022); it ignores the Grams.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from many.merging.config import AverageConfig


def merge(deltas: Sequence[Tensor], grams: Sequence[Tensor] | None, cfg: AverageConfig) -> Tensor:
    """M = (1/T) Σ_i ΔW_i for one layer; `deltas` are (out, in), `grams` are ignored."""
    stacked = torch.stack([delta.to(torch.float64) for delta in deltas])  # (T, out, in)
    return stacked.mean(dim=0).to(deltas[0].dtype)  # (out, in)
