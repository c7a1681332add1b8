"""Low-rank parameter merging (LPM) by recursive least squares — MAny (arXiv 2604.14016), DESIGN.md §1.

For one LoRA-targeted linear layer with frozen weight W0 (out×in), task i contributes the update
ΔW_i = s_i·B_i A_i and the Gram G_i = X_iᵀX_i / N_i of the layer's inputs. The merge is the ridge
least-squares fit to every task's outputs on its own inputs:

    M_t = argmin_M Σ_i ‖X_i Mᵀ − X_i ΔW_iᵀ‖² / N_i + γ‖M‖²
    M_tᵀ = C_t⁻¹ R_t,   C_t = γI + Σ_i G̃_i,   R_t = Σ_i G̃_i ΔW_iᵀ,   G̃_i = a·G_i + (1−a)·diag(G_i)

`absorb` folds one task into the running state (C_t = C_{t−1} + G̃_t, R_t = R_{t−1} + G̃_t ΔW_tᵀ) and
`solve` returns M_t; both cost the same whatever t is. Because M_t = Σ_i (s_i B_i)(A_i G̃_i C_t⁻¹), the
merge is exactly a LoRA of rank Σ r_i: the state also keeps the concatenated s_i B_i and the stacked
A_i G̃_i, and `export_lora` returns that LoRA (`truncate` optionally shrinks it by SVD).

Everything is float64 inside; inputs may be float32. Functions are pure: a new state is returned and
the old one is left as it was, so a merge can be cached, resumed and checked against `batch_merge`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from many.config import LPMConfig

_F64 = torch.float64
_STATE_KEYS = ("C", "R", "B", "AG", "gamma", "tasks")


@dataclass(frozen=True, eq=False)  # eq=False: a field-wise == on tensors has no truth value
class LayerState:
    """RLS state of one layer after `tasks` tasks: C = γI + Σ G̃_i, R = Σ G̃_i ΔW_iᵀ = AGᵀ Bᵀ."""

    C: Tensor  # (in, in)   float64
    R: Tensor  # (in, out)  float64
    B: Tensor  # (out, Σr)  float64, [s_1 B_1 | … | s_t B_t]
    AG: Tensor  # (Σr, in)  float64, [A_1 G̃_1; …; A_t G̃_t]
    gamma: float  # the absolute ridge added to C, fixed at the first task
    tasks: int

    def __post_init__(self) -> None:
        problems = []
        for name in ("C", "R", "B", "AG"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.ndim != 2 or value.dtype != _F64:
                problems.append(f"{name} must be a 2-D float64 tensor")
        if not problems:
            n, out, rank = self.C.shape[0], self.B.shape[0], self.B.shape[1]
            expected = {"C": (n, n), "R": (n, out), "B": (out, rank), "AG": (rank, n)}
            problems += [
                f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}"
                for name, shape in expected.items()
                if tuple(getattr(self, name).shape) != shape
            ]
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            problems.append(f"gamma must be finite and ≥ 0, got {self.gamma}")
        if self.tasks < 1:
            problems.append(f"tasks must be ≥ 1, got {self.tasks}")
        if problems:
            raise ValueError("LayerState: " + "; ".join(problems))

    @property
    def in_features(self) -> int:
        return self.C.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def rank(self) -> int:
        """Σ r_i: the rank of the exact merged LoRA."""
        return self.B.shape[1]


def _fail(layer: str, problem: str) -> ValueError:
    return ValueError(f"LPM layer {layer!r}: {problem}")


def _all_finite(tensor: Tensor) -> bool:
    """No NaN or Inf in `tensor`. One float64 sum instead of `isfinite`'s three element-wise passes: any NaN or Inf
    makes the sum non-finite, and only a non-finite sum (which huge finite values can also give) is re-checked."""
    return math.isfinite(tensor.sum(dtype=_F64).item()) or bool(torch.isfinite(tensor).all())


def _matrix(value: Tensor, name: str, layer: str, device: torch.device | None = None) -> Tensor:
    """`value` as a finite float64 matrix, or a ValueError naming the layer and the problem."""
    if not isinstance(value, Tensor):
        raise _fail(layer, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise _fail(layer, f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if not _all_finite(value):
        raise _fail(layer, f"{name} contains NaN or Inf")
    return value.to(device=device, dtype=_F64)


def _task(
    lora_B: Tensor, lora_A: Tensor, scale: float, gram: Tensor, layer: str, device: torch.device | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One task's (B, A, G) validated against each other and converted to float64."""
    B = _matrix(lora_B, "lora_B", layer, device)
    A = _matrix(lora_A, "lora_A", layer, device)
    G = _matrix(gram, "gram", layer, device)
    if B.shape[1] == 0 or A.shape[0] == 0:
        raise _fail(layer, f"rank 0 (lora_B {tuple(B.shape)}, lora_A {tuple(A.shape)}): a LoRA needs rank ≥ 1")
    if B.shape[1] != A.shape[0]:
        raise _fail(layer, f"lora_B {tuple(B.shape)} and lora_A {tuple(A.shape)} have different ranks")
    if B.shape[0] == 0 or A.shape[1] == 0:
        raise _fail(layer, f"empty layer (lora_B {tuple(B.shape)}, lora_A {tuple(A.shape)})")
    n = A.shape[1]
    if G.shape != (n, n):
        raise _fail(layer, f"gram has shape {tuple(G.shape)}, expected ({n}, {n}) to match lora_A {tuple(A.shape)}")
    if not math.isfinite(scale):
        raise _fail(layer, f"scale must be finite, got {scale}")
    return B, A, G


def regularize(gram: Tensor, a: float) -> Tensor:
    """G̃ = a·G + (1−a)·diag(G) in float64 (RegMean's shrinkage of the off-diagonal).

    With a == 1 and a float64 `gram` this is `gram` itself, not a copy.
    """
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"LPM: a must lie in [0, 1], got {a}")
    gram = gram.to(_F64)
    if a == 1.0:
        return gram
    shrunk = a * gram
    shrunk.diagonal().add_((1.0 - a) * gram.diagonal())
    return shrunk


def _ridge(gram_reg: Tensor, cfg: LPMConfig) -> float:
    """The absolute γ for a layer whose first task has regularised Gram `gram_reg`."""
    if cfg.gamma_mode == "absolute":
        return float(cfg.gamma)
    return float(cfg.gamma) * gram_reg.diagonal().mean().item()


def _solve_spd(C: Tensor, rhs: Tensor, gamma: float, layer: str) -> Tensor:
    """C⁻¹ rhs by Cholesky (C symmetric positive definite), never forming an inverse."""
    factor, info = torch.linalg.cholesky_ex(C)
    if info.item() != 0:
        raise _fail(
            layer,
            f"C = γI + Σ G̃ is not positive definite (Cholesky failed at order {info.item()}, γ = {gamma:g}); "
            "use a larger gamma (LPMConfig.gamma)",
        )
    solution = torch.cholesky_solve(rhs, factor)
    if not _all_finite(solution):
        raise _fail(layer, f"the solve gave NaN or Inf (C is ill-conditioned, γ = {gamma:g}); use a larger gamma")
    return solution


def absorb(
    state: LayerState | None,
    lora_B: Tensor,
    lora_A: Tensor,
    scale: float,
    gram: Tensor,
    cfg: LPMConfig,
    layer: str,
) -> LayerState:
    """Fold task t into the state of tasks < t (None for the first task): C += G̃_t, R += G̃_t ΔW_tᵀ.

    `lora_B` (out, r), `lora_A` (r, in), `scale` = alpha/r, `gram` (in, in). γ is fixed at the first task
    (relative mode: cfg.gamma · mean diag G̃_1) and kept in the state, so later tasks keep the recursion exact;
    cfg.gamma is not read again after the first task.
    """
    device = None if state is None else state.C.device
    B, A, G = _task(lora_B, lora_A, scale, gram, layer, device)
    if state is not None and (state.out_features, state.in_features) != (B.shape[0], A.shape[1]):
        raise _fail(
            layer,
            f"task is {B.shape[0]}×{A.shape[1]} (out×in) but the state holds a "
            f"{state.out_features}×{state.in_features} layer",
        )
    gram_reg = regularize(G, cfg.a)
    scaled_B = scale * B
    # A G̃ is r×in; G̃ ΔWᵀ = (A G̃)ᵀ (s B)ᵀ never forms an in×in×out product.
    task_AG = A @ gram_reg
    if state is None:
        gamma = _ridge(gram_reg, cfg)
        C = gram_reg.clone()
        C.diagonal().add_(gamma)
        return LayerState(C=C, R=task_AG.T @ scaled_B.T, B=scaled_B, AG=task_AG, gamma=gamma, tasks=1)
    return LayerState(
        C=state.C + gram_reg,
        R=torch.addmm(state.R, task_AG.T, scaled_B.T),
        B=torch.cat([state.B, scaled_B], dim=1),
        AG=torch.cat([state.AG, task_AG], dim=0),
        gamma=state.gamma,
        tasks=state.tasks + 1,
    )


def solve(state: LayerState, layer: str) -> Tensor:
    """The merged update M_t (out, in), float64: M_tᵀ = C_t⁻¹ R_t."""
    return _solve_spd(state.C, state.R, state.gamma, layer).T.contiguous()


def export_lora(state: LayerState, layer: str) -> tuple[Tensor, Tensor]:
    """The merge as an exact LoRA of rank Σr with scale 1: (B, AG·C⁻¹), so B_merged @ A_merged == solve(state)."""
    merged_A = _solve_spd(state.C, state.AG.T, state.gamma, layer).T.contiguous()
    return state.B.clone(), merged_A


def truncate(B: Tensor, A: Tensor, rank: int, layer: str = "<truncate>") -> tuple[Tensor, Tensor, float]:
    """Best rank-`rank` factors of B@A and the relative Frobenius error ‖BA − B'A'‖ / ‖BA‖.

    Works on the thin factors only: B = Q_B R_B, Aᵀ = Q_A R_A, so B A = Q_B (R_B R_Aᵀ) Q_Aᵀ and the SVD of the
    small core gives the SVD of B A. The kept singular values are split evenly (√σ) between the factors.
    A rank at or above B's column count returns the factors unchanged (in float64) with error 0.
    """
    B = _matrix(B, "B", layer)
    A = _matrix(A, "A", layer)
    if B.shape[1] != A.shape[0]:
        raise _fail(layer, f"B {tuple(B.shape)} and A {tuple(A.shape)} have different ranks")
    if rank < 1:
        raise _fail(layer, f"truncation rank must be ≥ 1, got {rank}")
    if rank >= B.shape[1]:
        return B.clone(), A.clone(), 0.0
    q_B, r_B = torch.linalg.qr(B)
    q_A, r_A = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(r_B @ r_A.T, full_matrices=False)
    total = S.square().sum().item()
    # The tail is summed directly (not total − head) so tiny errors keep their precision.
    error = math.sqrt(S[rank:].square().sum().item() / total) if total > 0 else 0.0
    root = S[:rank].sqrt()
    return (q_B @ U[:, :rank]) * root, (root[:, None] * Vh[:rank]) @ q_A.T, error


def batch_merge(
    loras: Sequence[tuple[Tensor, Tensor, float]], grams: Sequence[Tensor], cfg: LPMConfig, layer: str
) -> Tensor:
    """The non-recursive formula with dense ΔW_i, the RegMean-style reference: Mᵀ = (γI + Σ G̃_i)⁻¹ Σ G̃_i ΔW_iᵀ.

    γ comes from the first task in relative mode, exactly as in `absorb`.
    """
    if len(loras) == 0:
        raise _fail(layer, "no tasks to merge (empty task list)")
    if len(loras) != len(grams):
        raise _fail(layer, f"{len(loras)} LoRAs but {len(grams)} Grams")
    tasks = [_task(B, A, scale, G, layer) for (B, A, scale), G in zip(loras, grams)]
    shapes = {(B.shape[0], A.shape[1]) for B, A, _ in tasks}
    if len(shapes) > 1:
        raise _fail(layer, f"tasks disagree on the layer's out×in shape: {sorted(shapes)}")
    grams_reg = [regularize(G, cfg.a) for _, _, G in tasks]
    gamma = _ridge(grams_reg[0], cfg)
    C = gamma * torch.eye(grams_reg[0].shape[0], dtype=_F64, device=grams_reg[0].device) + sum(grams_reg)
    R = sum(G @ (scale * B @ A).T for G, (B, A, _), (_, _, scale) in zip(grams_reg, tasks, loras))
    return _solve_spd(C, R, gamma, layer).T.contiguous()


def absorb_model(
    states: Mapping[str, LayerState] | None,
    loras: Mapping[str, tuple[Tensor, Tensor, float]],
    grams: Mapping[str, Tensor],
    cfg: LPMConfig,
) -> dict[str, LayerState]:
    """`absorb` for every LoRA layer of a model; keys are PEFT module names. Grams may hold extra layers."""
    if not loras:
        raise ValueError("LPM: the task has no LoRA layers")
    no_gram = sorted(set(loras) - set(grams))
    if no_gram:
        raise ValueError(f"LPM: missing Grams for layers {no_gram}")
    if states is not None:
        no_state = sorted(set(loras) - set(states))
        no_lora = sorted(set(states) - set(loras))
        if no_state or no_lora:
            raise ValueError(
                f"LPM: the task's LoRA layers and the merge state differ: missing states for {no_state}, "
                f"missing LoRAs for {no_lora}"
            )
    return {
        name: absorb(None if states is None else states[name], B, A, scale, grams[name], cfg, name)
        for name, (B, A, scale) in loras.items()
    }


def state_tensors(state: LayerState) -> dict[str, Tensor]:
    """The state as named tensors (γ and the task count as 0-d tensors), ready for safetensors."""
    return {
        "C": state.C.contiguous(),
        "R": state.R.contiguous(),
        "B": state.B.contiguous(),
        "AG": state.AG.contiguous(),
        "gamma": torch.tensor(state.gamma, dtype=_F64),
        "tasks": torch.tensor(state.tasks, dtype=torch.int64),
    }


def state_from_tensors(tensors: Mapping[str, Tensor], layer: str = "<state>") -> LayerState:
    """Inverse of `state_tensors`; checks the keys, shapes and finiteness."""
    if set(tensors) != set(_STATE_KEYS):
        raise _fail(layer, f"state tensors must have keys {sorted(_STATE_KEYS)}, got {sorted(tensors)}")
    for name in ("gamma", "tasks"):
        if tensors[name].numel() != 1:
            raise _fail(layer, f"state tensor {name!r} must be a scalar, got shape {tuple(tensors[name].shape)}")
    matrices = {name: _matrix(tensors[name], name, layer) for name in ("C", "R", "B", "AG")}
    try:
        return LayerState(**matrices, gamma=float(tensors["gamma"].item()), tasks=int(tensors["tasks"].item()))
    except ValueError as error:
        raise _fail(layer, str(error)) from None
