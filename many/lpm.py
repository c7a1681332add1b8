"""Low-rank parameter merging (LPM) by recursive least squares — MAny (arXiv 2604.14016), DESIGN.md §1.

For one LoRA-targeted linear layer with frozen weight W0 (out×in), task i contributes the update
ΔW_i = s_i·B_i A_i and the Gram G_i = X_iᵀX_i / N_i of the layer's inputs. The merge is the ridge
least-squares fit to every task's outputs on its own inputs:

    M_t = argmin_M Σ_i ‖X_i Mᵀ − X_i ΔW_iᵀ‖² / N_i + γ‖M‖²
    M_tᵀ = C_t⁻¹ R_t,   C_t = γI + Σ_i G̃_i,   R_t = Σ_i G̃_i ΔW_iᵀ,   G̃_i = a·G_i + (1−a)·diag(G_i)

Because R_t = Σ_i (A_i G̃_i)ᵀ (s_i B_i)ᵀ = AGᵀ Bᵀ, the state keeps C, the concatenated B = [s_1 B_1 | … | s_t B_t]
and the stacked AG = [A_1 G̃_1; …; A_t G̃_t] — never R itself (in×out, the largest matrix, and redundant). The merge
is then exactly a LoRA of rank Σ r_i, M_t = B (AG C_t⁻¹): `export_lora` returns it, `solve` multiplies it out, and
`truncate` optionally shrinks it by SVD. `absorb` folds one task into the running state (C_t = C_{t−1} + G̃_t,
B and AG grow by r_t columns / rows); its cost does not depend on t beyond those thin factors.

Layers fed by the same input (q/k/v after one norm, gate/up after another) have the same Gram, hence the same C
and γ: `absorb_group` and `export_group` compute C, and factor it, once for the whole group, and its LayerStates
share one C tensor. `group_tensors` stores a group as one safetensors file with C once.

Everything is float64 inside; inputs may be float32 (and C may be stored float32 between tasks). Functions are
pure: a new state is returned and the old one is left as it was, so a merge can be cached, resumed and checked
against `batch_merge`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from many.config import LPMConfig

_F64 = torch.float64
GROUP_FORMAT = "many.lpm.group/1"  # "format" in the safetensors metadata of a stored group state
_METADATA_KEY = "lpm_group"
_SCALARS = ("gamma", "tasks")

LoRA = tuple[Tensor, Tensor, float]  # (lora_B (out, r), lora_A (r, in), scale s = alpha / r)


@dataclass(frozen=True, eq=False)  # eq=False: a field-wise == on tensors has no truth value
class LayerState:
    """RLS state of one layer after `tasks` tasks: C = γI + Σ G̃_i; R = Σ G̃_i ΔW_iᵀ = AGᵀ Bᵀ is not stored.

    Layers of one input group share the same C tensor object (see `absorb_group`)."""

    C: Tensor  # (in, in)   float64
    B: Tensor  # (out, Σr)  float64, [s_1 B_1 | … | s_t B_t]
    AG: Tensor  # (Σr, in)  float64, [A_1 G̃_1; …; A_t G̃_t]
    gamma: float  # the absolute ridge added to C, fixed at the first task
    tasks: int

    def __post_init__(self) -> None:
        problems = []
        for name in ("C", "B", "AG"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.ndim != 2 or value.dtype != _F64:
                problems.append(f"{name} must be a 2-D float64 tensor")
        if not problems:
            n, out, rank = self.C.shape[0], self.B.shape[0], self.B.shape[1]
            expected = {"C": (n, n), "B": (out, rank), "AG": (rank, n)}
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
    def R(self) -> Tensor:
        """R = Σ G̃_i ΔW_iᵀ = AGᵀ Bᵀ (in, out), formed on demand (for references and benchmarks only)."""
        return self.AG.T @ self.B.T

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


def _lora(lora_B: Tensor, lora_A: Tensor, scale: float, layer: str, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """One task's (B (out, r), A (r, in)) of one layer, validated against each other and converted to float64."""
    B = _matrix(lora_B, "lora_B", layer, device)
    A = _matrix(lora_A, "lora_A", layer, device)
    if B.shape[1] == 0 or A.shape[0] == 0:
        raise _fail(layer, f"rank 0 (lora_B {tuple(B.shape)}, lora_A {tuple(A.shape)}): a LoRA needs rank ≥ 1")
    if B.shape[1] != A.shape[0]:
        raise _fail(layer, f"lora_B {tuple(B.shape)} and lora_A {tuple(A.shape)} have different ranks")
    if B.shape[0] == 0 or A.shape[1] == 0:
        raise _fail(layer, f"empty layer (lora_B {tuple(B.shape)}, lora_A {tuple(A.shape)})")
    if not math.isfinite(scale):
        raise _fail(layer, f"scale must be finite, got {scale}")
    return B, A


def _check_gram(G: Tensor, A: Tensor, layer: str) -> None:
    n = A.shape[1]
    if G.shape != (n, n):
        raise _fail(layer, f"gram has shape {tuple(G.shape)}, expected ({n}, {n}) to match lora_A {tuple(A.shape)}")


def _task(
    lora_B: Tensor, lora_A: Tensor, scale: float, gram: Tensor, layer: str, device: torch.device | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One task's (B, A, G) validated against each other and converted to float64."""
    B, A = _lora(lora_B, lora_A, scale, layer, device)
    G = _matrix(gram, "gram", layer, device)
    _check_gram(G, A, layer)
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


def _cholesky(C: Tensor, gamma: float, layer: str) -> Tensor:
    """The lower Cholesky factor L of C = L Lᵀ (C symmetric positive definite)."""
    factor, info = torch.linalg.cholesky_ex(C)
    if info.item() != 0:
        raise _fail(
            layer,
            f"C = γI + Σ G̃ is not positive definite (Cholesky failed at order {info.item()}, γ = {gamma:g}); "
            "use a larger gamma (LPMConfig.gamma)",
        )
    return factor


def _solve_with(factor: Tensor, rhs: Tensor, gamma: float, layer: str) -> Tensor:
    """C⁻¹ rhs from C's Cholesky factor, never forming an inverse."""
    solution = torch.cholesky_solve(rhs, factor)
    if not _all_finite(solution):
        raise _fail(layer, f"the solve gave NaN or Inf (C is ill-conditioned, γ = {gamma:g}); use a larger gamma")
    return solution


def _solve_spd(C: Tensor, rhs: Tensor, gamma: float, layer: str) -> Tensor:
    """C⁻¹ rhs by Cholesky (C symmetric positive definite)."""
    return _solve_with(_cholesky(C, gamma, layer), rhs, gamma, layer)


def _shared(states: Mapping[str, LayerState], group: str) -> LayerState:
    """The first state of a group, after checking that all of them share one C tensor, γ and task count."""
    if not states:
        raise _fail(group, "the group holds no layers")
    first_name, first = next(iter(states.items()))
    for name, state in states.items():
        if state.C is not first.C or state.gamma != first.gamma or state.tasks != first.tasks:
            raise _fail(
                group,
                f"the states of {first_name!r} and {name!r} do not share one C, γ and task count; only layers "
                "merged together from one Gram (absorb_group) form a group",
            )
    return first


def absorb_group(
    states: Mapping[str, LayerState] | None,
    loras: Mapping[str, LoRA],
    gram: Tensor,
    cfg: LPMConfig,
    group: str,
) -> dict[str, LayerState]:
    """Fold task t into the states of the layers that read one input (so share its Gram G_t):

        C_t = C_{t−1} + G̃_t                          once for the group (γI + G̃_1 at t = 1)
        B_t = [B_{t−1} | s_t B_t],  AG_t = [AG_{t−1}; A_t G̃_t]      per layer

    `states`: the group's states of tasks < t (None for the first task), sharing one C; `loras`: {layer: (lora_B (out, r),
    lora_A (r, in), scale = alpha/r)}; `gram` (in, in). γ is fixed at the first task (relative mode: cfg.gamma · mean
    diag G̃_1) and kept in the state, so later tasks keep the recursion exact; cfg.gamma is not read after the first
    task. The returned states share one new C tensor; the old ones are left as they were.
    """
    if not loras:
        raise _fail(group, "the group has no LoRA layers")
    previous = None
    if states is not None:
        if set(states) != set(loras):
            raise _fail(group, f"the group's state holds layers {sorted(states)} but the task has LoRAs for {sorted(loras)}")
        previous = _shared(states, group)
    device = None if previous is None else previous.C.device
    factors = {name: _lora(B, A, scale, name, device) for name, (B, A, scale) in loras.items()}
    G = _matrix(gram, "gram", group, device)
    for name, (B, A) in factors.items():
        _check_gram(G, A, name)
        if states is not None and (states[name].out_features, states[name].in_features) != (B.shape[0], A.shape[1]):
            raise _fail(
                name,
                f"task is {B.shape[0]}×{A.shape[1]} (out×in) but the state holds a "
                f"{states[name].out_features}×{states[name].in_features} layer",
            )
    gram_reg = regularize(G, cfg.a)  # G̃_t (in, in)
    if previous is None:
        gamma, tasks = _ridge(gram_reg, cfg), 1
        C = gram_reg.clone()
        C.diagonal().add_(gamma)
    else:
        gamma, tasks = previous.gamma, previous.tasks + 1
        C = previous.C + gram_reg
    new = {}
    for name, (B, A) in factors.items():
        scaled_B = loras[name][2] * B  # s_t B_t (out, r)
        task_AG = A @ gram_reg  # A_t G̃_t (r, in): G̃ ΔWᵀ = (A G̃)ᵀ (s B)ᵀ never forms an in×out product
        if states is not None:
            scaled_B = torch.cat([states[name].B, scaled_B], dim=1)
            task_AG = torch.cat([states[name].AG, task_AG], dim=0)
        new[name] = LayerState(C=C, B=scaled_B, AG=task_AG, gamma=gamma, tasks=tasks)
    return new


def absorb(
    state: LayerState | None,
    lora_B: Tensor,
    lora_A: Tensor,
    scale: float,
    gram: Tensor,
    cfg: LPMConfig,
    layer: str,
) -> LayerState:
    """`absorb_group` for one layer: C_t = C_{t−1} + G̃_t, B_t = [B_{t−1} | s_t B_t], AG_t = [AG_{t−1}; A_t G̃_t].

    `lora_B` (out, r), `lora_A` (r, in), `scale` = alpha/r, `gram` (in, in); `state` None for the first task.
    """
    states = None if state is None else {layer: state}
    return absorb_group(states, {layer: (lora_B, lora_A, scale)}, gram, cfg, layer)[layer]


def export_group(states: Mapping[str, LayerState], group: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Each layer's merge as an exact LoRA of rank Σr with scale 1: M_t = B (AG C_t⁻¹), i.e. (B, (C_t⁻¹ AGᵀ)ᵀ).

    C_t is factored once for the group (the layers share it); each layer's solve uses only its own AG, so a layer's
    factors are the same bits whether it is exported alone (`export_lora`) or with its group.
    """
    first = _shared(states, group)
    factor = _cholesky(first.C, first.gamma, group)
    return {
        name: (state.B.clone(), _solve_with(factor, state.AG.T, state.gamma, name).T.contiguous())  # (out, Σr), (Σr, in)
        for name, state in states.items()
    }


def export_lora(state: LayerState, layer: str) -> tuple[Tensor, Tensor]:
    """The merge as an exact LoRA of rank Σr with scale 1: (B, AG·C⁻¹), so B_merged @ A_merged == solve(state)."""
    return export_group({layer: state}, layer)[layer]


def solve(state: LayerState, layer: str) -> Tensor:
    """The merged update M_t (out, in), float64: M_t = (C_t⁻¹ R_t)ᵀ = B (AG C_t⁻¹), R_t = AGᵀ Bᵀ never formed."""
    merged_B, merged_A = export_lora(state, layer)
    return merged_B @ merged_A


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
    loras: Mapping[str, LoRA],
    grams: Mapping[str, Tensor],
    cfg: LPMConfig,
) -> dict[str, LayerState]:
    """`absorb` for every LoRA layer of a model; keys are PEFT module names. Grams may hold extra layers.

    Layers given the same Gram tensor object (as `many.stats.load_grams` returns for layers that read one input) and
    sharing one previous C are absorbed as a group (`absorb_group`): their new states share one C.
    """
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
    groups: dict[tuple[int, int], list[str]] = {}
    for name in loras:
        groups.setdefault((id(grams[name]), 0 if states is None else id(states[name].C)), []).append(name)
    merged: dict[str, LayerState] = {}
    for names in groups.values():
        before = None if states is None else {name: states[name] for name in names}
        merged |= absorb_group(before, {name: loras[name] for name in names}, grams[names[0]], cfg, names[0])
    return {name: merged[name] for name in loras}


def group_tensors(
    states: Mapping[str, LayerState], c_dtype: torch.dtype = _F64
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A group's states as (named tensors, string metadata) for one safetensors file, C stored once:

        "C" (in, in) in `c_dtype`, "gamma" and "tasks" 0-d, "B.<layer>" (out, Σr) and "AG.<layer>" (Σr, in) float64;
        metadata {"lpm_group": JSON {"format": GROUP_FORMAT, "layers": [layer names]}}.

    A float32 C halves the file but rounds the running sum once per task (the merge itself stays float64).
    """
    first = _shared(states, "<group>")
    tensors = {
        "C": first.C.to(c_dtype).contiguous(),
        "gamma": torch.tensor(first.gamma, dtype=_F64),
        "tasks": torch.tensor(first.tasks, dtype=torch.int64),
    }
    for name, state in states.items():
        tensors[f"B.{name}"] = state.B.contiguous()
        tensors[f"AG.{name}"] = state.AG.contiguous()
    # One metadata key: safetensors writes several in a random order, and stored bytes must not vary between runs.
    return tensors, {_METADATA_KEY: json.dumps({"format": GROUP_FORMAT, "layers": list(states)})}


def group_layers(metadata: Mapping[str, str] | None, group: str = "<state>") -> list[str]:
    """The layer names of a stored group, from its safetensors metadata (no tensor is read)."""
    try:
        stored = json.loads((metadata or {})[_METADATA_KEY])
    except (KeyError, TypeError, ValueError):
        stored = {}
    if not isinstance(stored, dict) or stored.get("format") != GROUP_FORMAT:
        raise _fail(
            group,
            f"not an LPM group state (no {_METADATA_KEY!r} metadata of format {GROUP_FORMAT!r}); it was written by "
            "an older version: recompute the merge",
        )
    layers = stored.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(name, str) for name in layers):
        raise _fail(group, f"the state's metadata 'layers' must be a non-empty list of names, got {layers!r}")
    return layers


def group_from_tensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None, group: str = "<state>"
) -> dict[str, LayerState]:
    """Inverse of `group_tensors`: {layer: LayerState}, all sharing one float64 C; checks keys, shapes, finiteness."""
    layers = group_layers(metadata, group)
    expected = {"C", *_SCALARS, *(f"B.{name}" for name in layers), *(f"AG.{name}" for name in layers)}
    if set(tensors) != expected:
        raise _fail(group, f"state tensors must have keys {sorted(expected)}, got {sorted(tensors)}")
    for name in _SCALARS:
        if tensors[name].numel() != 1:
            raise _fail(group, f"state tensor {name!r} must be a scalar, got shape {tuple(tensors[name].shape)}")
    C = _matrix(tensors["C"], "C", group)
    gamma, tasks = float(tensors["gamma"].item()), int(tensors["tasks"].item())
    states = {}
    for name in layers:
        B = _matrix(tensors[f"B.{name}"], "B", name)
        AG = _matrix(tensors[f"AG.{name}"], "AG", name)
        try:
            states[name] = LayerState(C=C, B=B, AG=AG, gamma=gamma, tasks=tasks)
        except ValueError as error:
            raise _fail(name, str(error)) from None
    return states
