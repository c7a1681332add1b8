"""TIES merging: trim, elect sign, disjoint merge (Yadav et al. 2023, "TIES-Merging: resolving
interference when merging models"; docs/design.md §1, comparison methods).

    trim:     T_i = ΔW_i with all but its top-k magnitudes zeroed (per task, per layer)
    elect:    σ = sign(Σ_i T_i)                                         (entry-wise)
    merge:    M = λ · mean_{i ∈ A} T_i,   A = {i : T_i ≠ 0 and sign(T_i) = σ}   (0 where A is empty)

k = round(density · numel), at least one entry; magnitude ties at the threshold are broken arbitrarily
(by `torch.topk`). Defaults are the paper's: density 0.2 (keep the top 20%), λ = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from many.merging.config import TiesConfig


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the round(density · numel) largest-magnitude entries of `delta`, zero the rest."""
    flat = delta.flatten()
    kept = max(1, round(density * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(kept).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(delta)


def merge(deltas: Sequence[Tensor], grams: Sequence[Tensor] | None, cfg: TiesConfig) -> Tensor:
    """TIES merge of one layer; `deltas` are (out, in), `grams` are ignored."""
    trimmed = torch.stack([trim(delta.to(torch.float64), cfg.density) for delta in deltas])  # (T, out, in)
    elected = trimmed.sum(dim=0).sign()  # (out, in), 0 where the trimmed values cancel exactly
    agrees = (trimmed.sign() == elected) & (trimmed != 0)  # (T, out, in)
    total = torch.where(agrees, trimmed, torch.zeros_like(trimmed)).sum(dim=0)  # (out, in)
    count = agrees.sum(dim=0)  # (out, in)
    disjoint_mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return (cfg.scale * disjoint_mean).to(deltas[0].dtype)  # (out, in)
