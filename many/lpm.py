"""Low-rank parameter merging (LPM) by recursive least squares — MAny (arXiv 2604.14016), docs/design.md §1.

For one LoRA-targeted linear layer with frozen weight W0 (out×in), task i contributes the update
ΔW_i = s_i·B_i A_i and the Gram G_i = X_iᵀX_i / N_i of the layer's inputs. The merge is the ridge
least-squares fit to every task's outputs on its own inputs:

    M_t = argmin_M Σ_i ‖X_i Mᵀ − X_i ΔW_iᵀ‖² / N_i + γ‖M‖²
    M_tᵀ = C_t⁻¹ R_t,   C_t = γI + Σ_i G̃_i,   R_t = Σ_i G̃_i ΔW_iᵀ,   G̃_i = a·G_i + (1−a)·diag(G_i)

Because R_t = Σ_i (A_i G̃_i)ᵀ (s_i B_i)ᵀ = AGᵀ Bᵀ, the state keeps C, the concatenated B = [s_1 B_1 | … | s_t B_t]
and the stacked AG = [A_1 G̃_1; …; A_t G̃_t] — the *thin* form, while it is smaller than R (in×out). The merge is
then exactly a LoRA of rank Σ r_i, M_t = B (AG C_t⁻¹). The thin factors grow by r_t per task; once they hold at least
as many numbers as R, Σr·(in + out) ≥ in·out (`dense_is_smaller`), the layer's state switches to the *dense* form,
the constant-size RLS state (C, R) with R = AGᵀBᵀ formed once, and stays there: R_t = R_{t−1} + (A_t G̃_t)ᵀ (s_t B_t)ᵀ.
The switch is per layer, automatic, and changes the merged M_t only by float64 rounding. So a state holds
min(thin, dense) numbers besides C, and a step costs O(in²·min(Σr, out)) besides C's Cholesky — never more than the
dense RLS step. `export_lora` returns the merge as an exact LoRA (thin: (B, AG C⁻¹) of rank Σr; dense: M_t against
an identity, rank min(in, out)), `solve` multiplies it out, and `truncate` optionally shrinks it by SVD.

Layers fed by the same input (q/k/v after one norm, gate/up after another) have the same Gram, hence the same C
and γ: `absorb_group` and `export_group` compute C, and factor it, once for the whole group, and its LayerStates
share one C tensor.

Everything is float64 inside; inputs may be float32 (and C may be stored float32 between tasks). Functions are
pure: a new state is returned and the old one is left as it was, so a merge can be cached, resumed and checked
against `batch_merge`. The algebra only: what inputs it accepts is checked in many.lpm_checks, and a state is stored
as files by many.lpm_files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from many import lpm_checks as checks
from many.config import LPMConfig

_F64 = torch.float64

LoRA = tuple[Tensor, Tensor, float]  # (lora_B (out, r), lora_A (r, in), scale s = alpha / r)


def dense_is_smaller(rank: int, in_features: int, out_features: int) -> bool:
    """Whether the dense RLS state R (in×out) holds no more numbers than the thin factors B (out×Σr) and AG (Σr×in):
    Σr·(in + out) ≥ in·out. The rule `absorb_group` switches a layer's state by (docs/design.md §1.1)."""
    return rank * (in_features + out_features) >= in_features * out_features


Form = Literal["auto", "thin", "dense"]


@dataclass(frozen=True, eq=False, kw_only=True)  # eq=False: a field-wise == on tensors has no truth value
class LayerState:
    """RLS state of one layer after `tasks` tasks: C = γI + Σ G̃_i and R = Σ G̃_i ΔW_iᵀ, R in one of two forms:

    thin  (B, AG), R = AGᵀ Bᵀ never formed: B (out, Σr) = [s_1 B_1 | … | s_t B_t], AG (Σr, in) = [A_1 G̃_1; …; A_t G̃_t];
    dense R (in, out) itself, once Σr·(in + out) ≥ in·out (`dense_is_smaller`); `rank` keeps Σr. At the step that
          formed R from thin factors (the switch, or a first task) those factors stay beside it, so that this step's
          export is the thin one — rank Σr, its solve cheaper than the dense one by as much as forming R cost —
          but only R is stored (many.lpm_files), and the next step drops them.

    Layers of one input group share the same C tensor object (see `absorb_group`)."""

    C: Tensor  # (in, in)   float64
    gamma: float  # the absolute ridge added to C, fixed at the first task
    tasks: int
    B: Tensor | None = None  # (out, Σr)  float64, thin form (and a dense state's export at its switch)
    AG: Tensor | None = None  # (Σr, in)  float64, thin form (idem)
    R: Tensor | None = None  # (in, out)  float64, dense form
    dense_rank: int | None = None  # Σr of a dense state (a thin one reads it off B)

    def __post_init__(self) -> None:
        checks.state(self)

    @property
    def form(self) -> Literal["thin", "dense"]:
        return "dense" if self.R is not None else "thin"

    def rhs(self) -> Tensor:
        """R = Σ G̃_i ΔW_iᵀ (in, out): the dense state's own, or AGᵀ Bᵀ formed on demand (references, benchmarks)."""
        return self.R if self.R is not None else self.AG.T @ self.B.T

    @property
    def in_features(self) -> int:
        return self.C.shape[0]

    @property
    def out_features(self) -> int:
        return self.R.shape[1] if self.R is not None else self.B.shape[0]

    @property
    def rank(self) -> int:
        """Σ r_i: the rank of the exact merged LoRA of a thin state (an upper bound on M_t's rank either way)."""
        return self.dense_rank if self.R is not None else self.B.shape[1]

    @property
    def numbers(self) -> int:
        """How many numbers the layer's stored state holds besides C: Σr·(in + out) thin, in·out dense."""
        return self.R.numel() if self.R is not None else self.B.numel() + self.AG.numel()


def regularize(gram: Tensor, a: float) -> Tensor:
    """G̃ = a·G + (1−a)·diag(G) in float64 (RegMean's shrinkage of the off-diagonal), (in, in).

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
    """The absolute γ for a layer whose first task has regularised Gram G̃_1 = `gram_reg`: cfg.gamma, or in relative
    mode cfg.gamma · mean diag G̃_1."""
    if cfg.gamma_mode == "absolute":
        return float(cfg.gamma)
    return float(cfg.gamma) * gram_reg.diagonal().mean().item()


def _cholesky(C: Tensor, gamma: float, layer: str) -> Tensor:
    """The lower Cholesky factor L of C = L Lᵀ (C symmetric positive definite), (in, in)."""
    factor, info = torch.linalg.cholesky_ex(C)
    if info.item() != 0:
        raise checks.fail(
            layer,
            f"C = γI + Σ G̃ is not positive definite (Cholesky failed at order {info.item()}, γ = {gamma:g}); "
            "use a larger gamma (LPMConfig.gamma)",
        )
    return factor


def _solve_with(factor: Tensor, rhs: Tensor, gamma: float, layer: str) -> Tensor:
    """C⁻¹ rhs from C's Cholesky factor L (C = L Lᵀ), never forming an inverse."""
    solution = torch.cholesky_solve(rhs, factor)
    if not checks.all_finite(solution):
        raise checks.fail(layer, f"the solve gave NaN or Inf (C is ill-conditioned, γ = {gamma:g}); use a larger gamma")
    return solution


def absorb_group(
    states: Mapping[str, LayerState] | None, loras: Mapping[str, LoRA], gram: Tensor, cfg: LPMConfig, group: str,
    form: Form | None = None,
) -> dict[str, LayerState]:
    """Fold task t into the states of the layers that read one input (so share its Gram G_t):

        C_t = C_{t−1} + G̃_t                                           once for the group (γI + G̃_1 at t = 1)
        thin:  B_t = [B_{t−1} | s_t B_t],  AG_t = [AG_{t−1}; A_t G̃_t]      per layer
        dense: R_t = R_{t−1} + (A_t G̃_t)ᵀ (s_t B_t)ᵀ                       per layer (R_{t−1} = AG_{t−1}ᵀ B_{t−1}ᵀ
                                                                        at the switch, formed once)

    A layer's state is dense once Σr·(in + out) ≥ in·out (`dense_is_smaller`) and stays dense (`form` or
    cfg.state_form "auto"); "thin" and "dense" force one form (tests, benchmarks; a dense state cannot go back).
    `states`: the group's states of tasks < t (None for the first task), sharing one C; `loras`: {layer: (lora_B (out, r),
    lora_A (r, in), scale = alpha/r)}; `gram` (in, in). γ is fixed at the first task (relative mode: cfg.gamma · mean
    diag G̃_1) and kept in the state, so later tasks keep the recursion exact; cfg.gamma is not read after the first
    task. The returned states share one new C tensor; the old ones are left as they were.
    """
    form = form or cfg.state_form
    previous = checks.group_fits(states, loras, group)  # the group's shared state of t − 1, or None
    device = None if previous is None else previous.C.device
    factors = {name: checks.lora(B, A, scale, name, device) for name, (B, A, scale) in loras.items()}  # float64
    G = checks.matrix(gram, "gram", group, device)  # (in, in)
    checks.task_fits(G, factors, states)
    gram_reg = regularize(G, cfg.a)  # G̃_t (in, in)
    if previous is None:
        gamma, tasks = _ridge(gram_reg, cfg), 1
        C = gram_reg.clone()  # C_1 = γI + G̃_1
        C.diagonal().add_(gamma)
    else:
        gamma, tasks = previous.gamma, previous.tasks + 1
        C = previous.C + gram_reg  # C_t = C_{t−1} + G̃_t
    new = {}
    for name, (B, A) in factors.items():
        before = None if states is None else states[name]
        scaled_B = loras[name][2] * B  # s_t B_t (out, r)
        task_AG = A @ gram_reg  # A_t G̃_t (r, in): G̃ ΔWᵀ = (A G̃)ᵀ (s B)ᵀ never forms an in×out product
        rank = B.shape[1] + (0 if before is None else before.rank)  # Σr after task t
        if _dense(form, before, rank, A.shape[1], B.shape[0], name):
            if before is not None and before.R is not None:
                R = torch.addmm(before.R, task_AG.T, scaled_B.T)  # R_{t−1} + (A_t G̃_t)ᵀ (s_t B_t)ᵀ (in, out)
                new[name] = LayerState(C=C, R=R, dense_rank=rank, gamma=gamma, tasks=tasks)
                continue
            if before is not None:  # the switch: R_{t−1} + G̃_t ΔW_tᵀ = [AG_{t−1}; A_t G̃_t]ᵀ [B_{t−1} | s_t B_t]ᵀ
                scaled_B = torch.cat([before.B, scaled_B], dim=1)  # (out, Σr)
                task_AG = torch.cat([before.AG, task_AG], dim=0)  # (Σr, in)
            R = task_AG.T @ scaled_B.T  # (in, out), formed once
            new[name] = LayerState(C=C, R=R, B=scaled_B, AG=task_AG, dense_rank=rank, gamma=gamma, tasks=tasks)
            continue
        if before is not None:
            scaled_B = torch.cat([before.B, scaled_B], dim=1)  # (out, Σr)
            task_AG = torch.cat([before.AG, task_AG], dim=0)  # (Σr, in)
        new[name] = LayerState(C=C, B=scaled_B, AG=task_AG, gamma=gamma, tasks=tasks)
    return new


def _dense(form: Form, before: LayerState | None, rank: int, n_in: int, n_out: int, layer: str) -> bool:
    """Whether the layer's state after this task is dense: forced by `form`, already dense, or now the smaller."""
    if form not in ("auto", "thin", "dense"):
        raise checks.fail(layer, f"state form must be 'auto', 'thin' or 'dense', got {form!r}")
    if before is not None and before.R is not None:
        if form == "thin":
            raise checks.fail(layer, "the state is dense (C, R): it cannot go back to thin factors")
        return True
    return form == "dense" or (form == "auto" and dense_is_smaller(rank, n_in, n_out))


def absorb(
    state: LayerState | None, lora_B: Tensor, lora_A: Tensor, scale: float, gram: Tensor, cfg: LPMConfig, layer: str,
    form: Form | None = None,
) -> LayerState:
    """`absorb_group` for one layer: C_t = C_{t−1} + G̃_t, and B, AG grow by r (thin) or R_t = R_{t−1} + G̃_t ΔW_tᵀ
    (dense). `lora_B` (out, r), `lora_A` (r, in), `scale` = alpha/r, `gram` (in, in); `state` None for the first task.
    """
    states = None if state is None else {layer: state}
    return absorb_group(states, {layer: (lora_B, lora_A, scale)}, gram, cfg, layer, form)[layer]


def absorb_model(
    states: Mapping[str, LayerState] | None, loras: Mapping[str, LoRA], grams: Mapping[str, Tensor], cfg: LPMConfig
) -> dict[str, LayerState]:
    """`absorb` for every LoRA layer of a model; keys are PEFT module names. Grams may hold extra layers.

    Layers given the same Gram tensor object (as `many.stats.load_grams` returns for layers that read one input) and
    sharing one previous C are absorbed as a group (`absorb_group`): their new states share one C.
    """
    checks.model_layers(loras, grams, states)
    groups: dict[tuple[int, int], list[str]] = {}
    for name in loras:
        groups.setdefault((id(grams[name]), 0 if states is None else id(states[name].C)), []).append(name)
    merged: dict[str, LayerState] = {}
    for names in groups.values():
        before = None if states is None else {name: states[name] for name in names}
        merged |= absorb_group(before, {name: loras[name] for name in names}, grams[names[0]], cfg, names[0])
    return {name: merged[name] for name in loras}


def export_group(states: Mapping[str, LayerState], group: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Each layer's merge M_t = (C_t⁻¹ R_t)ᵀ as an exact LoRA with scale 1, (lora_B, lora_A):

        thin:  (B, (C_t⁻¹ AGᵀ)ᵀ)                  rank Σr; R_t = AGᵀBᵀ is never formed (also from a dense state at
                                                 the step that formed its R: it keeps those factors, LayerState)
        dense: (M_t, I_in) if in ≤ out, else (I_out, M_t)     rank min(in, out); B_m @ A_m == M_t bit for bit

    C_t is factored once for the group (the layers share it); each layer's solve uses only its own AG or R, so a
    layer's factors are the same bits whether it is exported alone (`export_lora`) or with its group.
    """
    first = checks.shared(states, group)
    factor = _cholesky(first.C, first.gamma, group)  # L (in, in), C_t = L Lᵀ
    out = {}
    for name, state in states.items():
        if state.B is not None:
            out[name] = (state.B.clone(), _solve_with(factor, state.AG.T, state.gamma, name).T.contiguous())
            continue
        merged = _solve_with(factor, state.R, state.gamma, name).T.contiguous()  # M_t (out, in)
        n_out, n_in = merged.shape
        eye = torch.eye(min(n_out, n_in), dtype=_F64, device=merged.device)
        out[name] = (merged, eye) if n_in <= n_out else (eye, merged)
    return out


def export_lora(state: LayerState, layer: str) -> tuple[Tensor, Tensor]:
    """The merge as an exact LoRA with scale 1 (`export_group`), so B_merged @ A_merged == solve(state)."""
    return export_group({layer: state}, layer)[layer]


def solve(state: LayerState, layer: str) -> Tensor:
    """The merged update M_t (out, in), float64: M_t = (C_t⁻¹ R_t)ᵀ; from a thin state B (AG C_t⁻¹), R never formed."""
    factor = _cholesky(state.C, state.gamma, layer)
    if state.R is not None:
        return _solve_with(factor, state.R, state.gamma, layer).T.contiguous()
    return state.B @ _solve_with(factor, state.AG.T, state.gamma, layer).T


def truncate(B: Tensor, A: Tensor, rank: int, layer: str = "<truncate>") -> tuple[Tensor, Tensor, float]:
    """Best rank-`rank` factors of B@A and the relative Frobenius error ‖BA − B'A'‖ / ‖BA‖.

    Works on the thin factors only: B = Q_B R_B, Aᵀ = Q_A R_A, so B A = Q_B (R_B R_Aᵀ) Q_Aᵀ and the SVD of the
    small core gives the SVD of B A. The kept singular values are split evenly (√σ) between the factors.
    A rank at or above B's column count returns the factors unchanged (in float64) with error 0.
    """
    B, A = checks.to_truncate(B, A, rank, layer)  # (out, r), (r, in) float64
    if rank >= B.shape[1]:
        return B.clone(), A.clone(), 0.0
    q_B, r_B = torch.linalg.qr(B)  # (out, r), (r, r)
    q_A, r_A = torch.linalg.qr(A.T)  # (in, r), (r, r)
    U, S, Vh = torch.linalg.svd(r_B @ r_A.T, full_matrices=False)  # the (r, r) core
    total = S.square().sum().item()
    # The tail is summed directly (not total − head) so tiny errors keep their precision.
    error = math.sqrt(S[rank:].square().sum().item() / total) if total > 0 else 0.0
    root = S[:rank].sqrt()
    return (q_B @ U[:, :rank]) * root, (root[:, None] * Vh[:rank]) @ q_A.T, error  # (out, rank), (rank, in)


def batch_merge(
    loras: Sequence[tuple[Tensor, Tensor, float]], grams: Sequence[Tensor], cfg: LPMConfig, layer: str
) -> Tensor:
    """The non-recursive formula with dense ΔW_i, the RegMean-style reference: Mᵀ = (γI + Σ G̃_i)⁻¹ Σ G̃_i ΔW_iᵀ.

    γ comes from the first task in relative mode, exactly as in `absorb`. Returns M (out, in) float64.
    """
    tasks = checks.tasks(loras, grams, layer)  # [(B (out, r), A (r, in), G (in, in))] float64
    grams_reg = [regularize(G, cfg.a) for _, _, G in tasks]
    gamma = _ridge(grams_reg[0], cfg)
    C = gamma * torch.eye(grams_reg[0].shape[0], dtype=_F64, device=grams_reg[0].device) + sum(grams_reg)  # (in, in)
    R = sum(G @ (scale * B @ A).T for G, (B, A, _), (_, _, scale) in zip(grams_reg, tasks, loras))  # (in, out)
    return _solve_with(_cholesky(C, gamma, layer), R, gamma, layer).T.contiguous()
