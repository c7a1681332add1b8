"""Task arithmetic: add the scaled sum of the task vectors (Ilharco et al. 2023, "Editing models with
task arithmetic"; docs/design.md §1, comparison methods).

    M = λ Σ_i ΔW_i

λ = 0.3 by default: the paper picks λ on held-out data from {0.1, …, 1.0} and 0.3–0.4 is the value it
(and the TIES paper's task-arithmetic baseline) most often lands on for several merged tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from many.merging.config import TaskArithmeticConfig


def merge(deltas: Sequence[Tensor], grams: Sequence[Tensor] | None, cfg: TaskArithmeticConfig) -> Tensor:
    """M = λ Σ_i ΔW_i for one layer; `deltas` are (out, in), `grams` are ignored."""
    stacked = torch.stack([delta.to(torch.float64) for delta in deltas])  # (T, out, in)
    return (cfg.scale * stacked.sum(dim=0)).to(deltas[0].dtype)  # (out, in)
