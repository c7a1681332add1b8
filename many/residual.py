"""MAny-R: the LPM-merged LoRA plus CPM-routed low-rank residuals (issue #16; docs/design.md §1.1, §1.2, §1.4).

The merge M_t fits every task's update in one matrix and loses some of each (its fit error, many.lpm_diagnostics).
MAny-R keeps, per task i ≤ t and LoRA layer, the best rank-k approximation of what the merge lost,

    D_i = ΔW_i − M_t = [s_i B_i | −B_m] [A_i ; A_m]          (out, r_i + Σr) @ (r_i + Σr, in)
    D_i ≈ U_i V_i                                           U_i (out, k), V_i (k, in): truncated SVD of D_i

computed from the thin factors only (many.lpm.truncate: QR of both stacked factors, SVD of the small core), so
nothing out×in is formed. At inference the residuals are mixed per image with CPM's weights w(x) — the same
weights that mix the projectors:

    y = (W0 + M_t) x + Σ_i w_i(x) U_i (V_i x)

With k ≥ rank D_i and routing one-hot on task i, the layer is exactly W0 + ΔW_i: task i's own adapter.

The weights sum to one, so Σ_i w_i (ΔW_i − M_t) = Σ_i w_i ΔW_i − M_t: a residual kept as the task's own factors
(s_i B_i, A_i), with the shared M_t subtracted, is exact for the bytes of the task's own LoRA, where the truncated
D_i needs rank r_i + Σr for that. So once k ≥ r_i a task keeps its own factors (`own_factors`, form "own") and the
layer becomes

    y = W0 x + Σ_i w_i(x) s_i B_i (A_i x)              (M_t cancels: each task's own adapter, routed by CPM)

and only k < r_i, fewer bytes than the task's own LoRA, truncates D_i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from many import lpm
from many.cpm import _check_weights

Factors = tuple[Tensor, Tensor]  # U (out, k), V (k, in)


def residual(task: tuple[Tensor, Tensor, float], merged: Factors, rank: int, layer: str = "<residual>") -> tuple[Tensor, Tensor, float]:
    """The rank-`rank` residual of one task's LoRA (B (out, r), A (r, in), scale s) against the merge M = B_m A_m:
    U (out, k), V (k, in) float64 with k = min(rank, r + Σr), and the relative Frobenius error ‖D − UV‖ / ‖D‖."""
    B, A, scale = task
    merged_B, merged_A = merged
    if B.shape[0] != merged_B.shape[0] or A.shape[1] != merged_A.shape[1]:
        raise ValueError(f"residual: layer {layer}: the task's update is {B.shape[0]}×{A.shape[1]} but the merge is "
                         f"{merged_B.shape[0]}×{merged_A.shape[1]}; pass the merge of the same base")
    stacked_B = torch.cat([scale * B.to(torch.float64), -merged_B.to(torch.float64)], dim=1)  # (out, r + Σr)
    stacked_A = torch.cat([A.to(torch.float64), merged_A.to(torch.float64)], dim=0)  # (r + Σr, in)
    return lpm.truncate(stacked_B, stacked_A, rank, layer)


def residuals(
    task: Mapping[str, tuple[Tensor, Tensor, float]], merged: Mapping[str, Factors], rank: int
) -> tuple[dict[str, Factors], dict[str, float]]:
    """`residual` for every layer of one task (PEFT module names; the merge must have the same layers):
    ({layer: (U, V) float32}, {layer: relative error})."""
    if set(task) != set(merged):
        raise ValueError(f"residuals: the task's adapter and the merge have different layers "
                         f"(only in the task: {sorted(set(task) - set(merged))[:3]}, "
                         f"only in the merge: {sorted(set(merged) - set(task))[:3]})")
    factors, errors = {}, {}
    for layer in sorted(task):
        U, V, error = residual(task[layer], merged[layer], rank, layer)
        factors[layer], errors[layer] = (U.float().contiguous(), V.float().contiguous()), error
    return factors, errors


def own_factors(task: Mapping[str, tuple[Tensor, Tensor, float]]) -> dict[str, Factors]:
    """{layer: (s·B (out, r), A (r, in))} float32: the task's own update ΔW_i = s B A as residual factors."""
    return {layer: ((scale * B).float().contiguous(), A.float().contiguous())
            for layer, (B, A, scale) in sorted(task.items())}


def task_rank(task: Mapping[str, tuple[Tensor, Tensor, float]]) -> int:
    """The largest LoRA rank r_i over the task's layers."""
    return max(A.shape[0] for _, A, _ in task.values())


class RoutedResidual(nn.Module):
    """A linear layer (W0 + M already in its weight) plus the tasks' residuals mixed per image:
    y = linear(x) + Σ_i w_i U_i (V_i x), w (B, T) set by `route` before the forward (as for cpm.RoutedProjector)."""

    def __init__(self, linear: nn.Linear, factors: Sequence[Factors | None]) -> None:
        super().__init__()
        if not factors:
            raise ValueError("RoutedResidual: needs one (U, V) or None per task, got none")
        out_features, in_features = linear.weight.shape
        rank = max([0] + [f[0].shape[1] for f in factors if f is not None])
        U = torch.zeros(len(factors), out_features, rank, dtype=torch.float64)  # (T, out, k); no residual: zeros
        V = torch.zeros(len(factors), rank, in_features, dtype=torch.float64)  # (T, k, in)
        for i, pair in enumerate(factors):
            if pair is None:
                continue
            u, v = pair
            if u.shape[0] != out_features or v.shape[1] != in_features or u.shape[1] != v.shape[0]:
                raise ValueError(f"RoutedResidual: task {i}'s residual is {tuple(u.shape)} @ {tuple(v.shape)}, "
                                 f"the layer is {out_features}×{in_features}")
            if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
                raise ValueError(f"RoutedResidual: task {i}'s residual contains NaN or Inf")
            U[i, :, : u.shape[1]], V[i, : v.shape[0]] = u, v
        self.linear = linear
        dtype, device = linear.weight.dtype, linear.weight.device
        self.register_buffer("U", U.to(device, dtype))
        self.register_buffer("V", V.to(device, dtype))
        self.weights: Tensor | None = None  # (B, T), a plain attribute like RoutedProjector's

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def route(self, weights: Tensor) -> RoutedResidual:
        """Set the (B, T) CPM weights of the next batch; returns self."""
        _check_weights(weights, self.U.shape[0])
        self.weights = weights.detach()
        return self

    def forward(self, x: Tensor) -> Tensor:  # (B, L, in) → (B, L, out)
        if self.weights is None:
            raise RuntimeError("RoutedResidual.route(weights) must be called before forward")
        if self.weights.shape[0] != x.shape[0]:
            raise RuntimeError(f"RoutedResidual: routed {self.weights.shape[0]} images but the batch has {x.shape[0]}")
        w = self.weights.to(x.device, x.dtype)  # (B, T)
        h = torch.einsum("bli,tki->bltk", x, self.V) * w[:, None, :, None]  # (B, L, T, k)
        return self.linear(x) + torch.einsum("bltk,tok->blo", h, self.U)
