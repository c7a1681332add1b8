"""RegMean: the batch least-squares merge of linear layers (Jin et al. 2023, "Dataless knowledge fusion
by merging weights of language models"; docs/design.md §1, comparison methods).

    G̃_i = a·G_i + (1−a)·diag(G_i)                      (in, in)
    C   = Σ_i G̃_i + γ·mean(diag(Σ_i G̃_i))·I             (in, in)
    Mᵀ  = C⁻¹ Σ_i G̃_i ΔW_iᵀ                             (in, out)

the M that best reproduces every task's layer outputs on its own inputs. Solved in float64 by Cholesky,
never an explicit inverse. a = 0.9 is the paper's default off-diagonal scale (a < 1 shrinks towards
the diagonal, which also keeps C positive definite when every input dimension has non-zero variance).
γ (relative ridge, default 0 = the paper's estimator) is only needed when some input dimension is
never active in any task. MAny's LPM (many/lpm.py) is the recursive form of the same estimator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from many.lpm import regularize  # G̃ = a·G + (1−a)·diag(G), shared with LPM
from many.merging.config import RegMeanConfig


def merge(deltas: Sequence[Tensor], grams: Sequence[Tensor] | None, cfg: RegMeanConfig) -> Tensor:
    """RegMean merge of one layer; `deltas` are (out, in), `grams` (in, in), one per task."""
    if grams is None:
        raise ValueError("regmean needs one Gram per task; got none (compute the stats stage first)")
    n_in = deltas[0].shape[1]
    C = torch.zeros(n_in, n_in, dtype=torch.float64, device=deltas[0].device)  # (in, in)
    R = torch.zeros(n_in, deltas[0].shape[0], dtype=torch.float64, device=C.device)  # (in, out)
    for gram, delta in zip(grams, deltas, strict=True):  # one task at a time: peak memory = one Gram
        tilde = regularize(gram.to(torch.float64), cfg.a)  # (in, in)
        C += tilde
        R += tilde @ delta.to(torch.float64).T
    C = C + cfg.gamma * torch.diagonal(C).mean() * torch.eye(n_in, dtype=C.dtype, device=C.device)
    L, info = torch.linalg.cholesky_ex(C)  # (in, in) lower triangular
    if info.item() != 0:
        raise ValueError(
            f"regmean: Σ G̃_i is not positive definite (Cholesky failed at column {info.item()}); "
            f"set gamma > 0 (e.g. 1e-4) or a < 1"
        )
    merged_t = torch.cholesky_solve(R, L)  # (in, out)
    if not torch.isfinite(merged_t).all():
        raise ValueError("regmean: the solve produced NaN/Inf; set gamma > 0 (e.g. 1e-4)")
    return merged_t.T.to(deltas[0].dtype)  # (out, in)
