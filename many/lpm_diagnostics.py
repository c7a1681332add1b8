"""Diagnostics of an LPM merge (docs/design.md §1.1 "Diagnostics", §2 merge_diagnostics[t]): for every LoRA layer and
every task i ≤ t, how well the merged update M = M_t still does task i's job on task i's inputs, and how strongly the
other tasks' updates act on them. Cheap and data-free: from the merged adapter, the tasks' adapters and their Grams.

With ΔW_i = s_i B_i A_i (out, in) task i's update of a layer and G_i = X_iᵀX_i / N_i (in, in) the Gram of the
layer's inputs in task i:

    fit error  e_i  = tr((M − ΔW_i) G_i (M − ΔW_i)ᵀ) / tr(ΔW_i G_i ΔW_iᵀ)
                    = ‖X_i Mᵀ − X_i ΔW_iᵀ‖² / ‖X_i ΔW_iᵀ‖²      (the relative error of the layer's output change)
    leakage    ℓ_ij = tr(ΔW_j G_i ΔW_jᵀ) / tr(ΔW_i G_i ΔW_iᵀ),  j ≠ i   (ℓ_ii = 1)
                    = how strongly task j's update acts on task i's inputs, relative to task i's own update

e_i = 0 means the merge reproduces task i's output change exactly; e_i = 1 is what M = 0 (no update at all) would
score, so e_i ≥ 1 means the merge does task i no good on that layer. ℓ_ij ≫ 0 means the tasks' updates share input
directions: the merge has to trade them against each other. The RAW G_i is used, not the merge's regularised
G̃_i = a·G_i + (1−a)·diag(G_i): the diagnostic measures the fit on task i's actual inputs, whatever shrinkage the
merge itself used (the two coincide at the default a = 1).

Every quantity is a G-weighted inner product ⟨U, V⟩_G = tr(U G Vᵀ) of low-rank matrices U = W_U Z_U (out×k, k×in),
computed from the thin factors without forming an out×in matrix:

    tr(W_U Z_U G Z_Vᵀ W_Vᵀ) = Σ( (W_Uᵀ W_V) ⊙ (Z_U G Z_Vᵀ) )

With the merged LoRA M = B_m A_m (scale 1, rank R) and ΔW_j = (s_j B_j) A_j, stacking W = [B_m | s_0 B_0 | … | s_t B_t]
(out, R+Σr) and Z = [A_m; A_0; …; A_t] (R+Σr, in) gives, per task i, the (t+2)×(t+2) matrix Q_i of every inner
product ⟨U_a, U_b⟩_{G_i} (U_0 = M, U_{1+j} = ΔW_j) as block sums of (WᵀW) ⊙ (Z G_i Zᵀ); then

    e_i = (Q_i[M,M] − 2 Q_i[M,i] + Q_i[i,i]) / Q_i[i,i],     ℓ_ij = Q_i[j,j] / Q_i[i,i].

Cost per layer and task: Z G_i, (R+Σr)·in² multiply-adds, plus one Gram of W per layer. What it reads is the real
cost: all t + 1 Grams of the layer's input group at step t (merge[t] itself reads one), e.g. 22 GB per task at
LLaVA-1.5-7B shapes; one Gram is in memory at a time.

Rounding can make a near-zero numerator slightly negative; e_i is clamped at 0. Where task i's own update does not
act on its inputs (tr(ΔW_i G_i ΔW_iᵀ) = 0, e.g. a LoRA whose B is still zero), e_i and ℓ_i· are undefined: None.

`inner_products` and `layer_diagnostics` / `group_diagnostics` are pure torch (float64 inside); `diagnose` reads the
files of the stages (a merged adapter dir, task dirs, Grams files) and returns the JSON of `diagnostics.json`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from many.lpm import LoRA

_F64 = torch.float64
FORMAT = "many.lpm.diagnostics/1"  # "format" of diagnostics.json


# -- the algebra -----------------------------------------------------------------------------------------------------


def inner_products(W: Tensor, Z: Tensor, blocks: Sequence[int], gram: Tensor) -> Tensor:
    """Q[a, b] = tr(U_a G U_bᵀ) for the low-rank matrices U_a = W[:, a-block] Z[a-block, :] (n×n, n = len(blocks)).

    `W` (out, k), `Z` (k, in), `blocks` the column widths of the U's (Σ blocks = k), `gram` G (in, in) symmetric.
    Q = Sᵀ ((WᵀW) ⊙ (Z G Zᵀ)) S with S (k, n) the one-hot block membership; no out×in matrix is formed.
    """
    W = W.to(_F64)
    return _block_sums(W.T @ W, Z.to(_F64), _membership(blocks), gram.to(_F64))


def _membership(blocks: Sequence[int]) -> Tensor:
    """S (k, n): S[c, a] = 1 iff column c of W (row c of Z) belongs to block a."""
    return torch.repeat_interleave(torch.eye(len(blocks), dtype=_F64), torch.tensor(list(blocks)), dim=0)


def _block_sums(WtW: Tensor, Z: Tensor, member: Tensor, G: Tensor) -> Tensor:
    """Sᵀ ((WᵀW) ⊙ (Z G Zᵀ)) S, (n, n); WtW (k, k), Z (k, in), G (in, in), all float64."""
    ZGZ = (Z @ G) @ Z.T  # (k, in) then (k, k): the one product with an in×in matrix
    return member.T @ (WtW * ZGZ) @ member


@dataclass(frozen=True)
class LayerDiagnostics:
    """One layer's diagnostics over tasks 0..t (lists in task order; None where task i's energy is 0)."""

    fit_error: list[float | None]  # e_i
    leakage: list[list[float | None]]  # ℓ_ij, row i = task i's inputs; ℓ_ii = 1
    energy: list[float]  # tr(ΔW_i G_i ΔW_iᵀ) = ‖X_i ΔW_iᵀ‖² / N_i, the denominator of row i


def _stacked(merged: LoRA, tasks: Sequence[LoRA]) -> tuple[Tensor, Tensor, Tensor]:
    """WᵀW (k, k) of W = [s_m B_m | s_0 B_0 | … ] (out, k), Z = [A_m; A_0; …] (k, in), and the block membership S
    (k, t + 2) of the widths [R, r_0, …, r_t]; W itself is not kept (out may be large, k is small)."""
    pairs = [merged, *tasks]
    for B, A, _ in pairs:
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"LPM diagnostics: LoRA factors B {tuple(B.shape)} and A {tuple(A.shape)} do not match")
    shapes = {(B.shape[0], A.shape[1]) for B, A, _ in pairs}
    if len(shapes) != 1:
        raise ValueError(f"LPM diagnostics: the merged and task updates have different shapes (out, in): {sorted(shapes)}")
    W = torch.cat([scale * B.to(_F64) for B, _, scale in pairs], dim=1)  # (out, k)
    Z = torch.cat([A.to(_F64) for _, A, _ in pairs], dim=0)  # (k, in)
    return W.T @ W, Z, _membership([A.shape[0] for _, A, _ in pairs])


def _row(Q: Tensor, i: int) -> tuple[float | None, list[float | None], float]:
    """(e_i, [ℓ_ij over j], energy_i) from Q_i, whose index 0 is M and 1 + j is ΔW_j."""
    own = Q[1 + i, 1 + i].item()
    if not own > 0.0:
        return None, [None] * (Q.shape[0] - 1), max(own, 0.0)
    error = (Q[0, 0] - 2.0 * Q[0, 1 + i] + Q[1 + i, 1 + i]).item() / own
    leakage = [1.0 if j == i else max(Q[1 + j, 1 + j].item(), 0.0) / own for j in range(Q.shape[0] - 1)]
    return max(error, 0.0), leakage, own


def group_diagnostics(
    merged: Mapping[str, LoRA], tasks: Sequence[Mapping[str, LoRA]], grams: Iterable[Tensor]
) -> dict[str, LayerDiagnostics]:
    """The diagnostics of the layers of one input group (they read one input, so share one Gram per task).

    `merged`: {layer: (B_m (out, R), A_m (R, in), scale)}, the merge after step t; `tasks`: one {layer: (B_i, A_i,
    s_i)} per task 0..t; `grams`: G_0, …, G_t (in, in), the group's Gram of each task — an iterable, consumed one at a
    time, so a caller can load each Gram only when it is needed (one in×in matrix in memory at once).
    """
    stacked = {layer: _stacked(lora, [task[layer] for task in tasks]) for layer, lora in merged.items()}
    rows: dict[str, list[tuple[float | None, list[float | None], float]]] = {layer: [] for layer in merged}
    count = 0
    for i, gram in enumerate(grams):
        if i >= len(tasks):
            raise ValueError(f"LPM diagnostics: more Grams than the {len(tasks)} tasks")
        G = gram.to(_F64)
        for layer, (WtW, Z, member) in stacked.items():
            if G.shape != (Z.shape[1], Z.shape[1]):
                raise ValueError(f"LPM diagnostics: layer {layer} reads {Z.shape[1]} features but task {i}'s Gram is "
                                 f"{tuple(G.shape)}")
            rows[layer].append(_row(_block_sums(WtW, Z, member, G), i))
        count += 1
    if count != len(tasks):
        raise ValueError(f"LPM diagnostics: {count} Grams for {len(tasks)} tasks; need one per task")
    return {
        layer: LayerDiagnostics([e for e, _, _ in per], [row for _, row, _ in per], [energy for _, _, energy in per])
        for layer, per in rows.items()
    }


def layer_diagnostics(merged: LoRA, tasks: Sequence[LoRA], grams: Sequence[Tensor]) -> LayerDiagnostics:
    """`group_diagnostics` of one layer: its merged LoRA, task i's LoRA and Gram G_i for i = 0..t."""
    return group_diagnostics({"layer": merged}, [{"layer": task} for task in tasks], grams)["layer"]


# -- from the stages' files ------------------------------------------------------------------------------------------


def _grams(path: Path, key: str) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).to(_F64)  # (in, in)


def diagnose(adapter_dir: Path, task_dirs: Sequence[Path], grams_files: Sequence[Path]) -> dict[str, Any]:
    """diagnostics.json of the merge after step t (docs/design.md §2): `adapter_dir` the merged PEFT adapter
    (merge[t]'s "adapter"), `task_dirs` the task directories of tasks 0..t (finetune[i]'s "task"), `grams_files`
    their Grams (stats[i]'s "grams"). The merged adapter is what the evals put on the model (truncated if lpm.rank is
    set), so that is what is diagnosed; it needs no solve with C.

        {"format": FORMAT, "tasks": t + 1,
         "groups": {group key: {"layers": [layer names],
                                "fit_error": {layer: [e_0, …, e_t]},
                                "leakage": {layer: [[ℓ_ij for j ≤ t] for i ≤ t]},
                                "energy": {layer: [tr(ΔW_i G_i ΔW_iᵀ) for i ≤ t]}}}}

    Groups and their layers in model order (the order of the Grams file's layer → group map, which the stats stage
    writes in module order); group key = the group's first layer, as in the Grams file and the merge state.
    """
    from many.adapters import ADAPTER_DIR, lora_factors
    from many.stats import read_gram_groups

    if len(task_dirs) != len(grams_files) or not task_dirs:
        raise ValueError(f"LPM diagnostics: {len(task_dirs)} task dirs and {len(grams_files)} Grams files; need one "
                         "of each per task, at least one")
    merged = lora_factors(Path(adapter_dir))
    tasks = [lora_factors(Path(d) / ADAPTER_DIR) for d in task_dirs]
    maps = [read_gram_groups(path) for path in grams_files]  # per task: {layer: group key} in model order
    for i, (task, groups) in enumerate(zip(tasks, maps)):
        if set(task) != set(merged) or not set(merged) <= set(groups):
            raise ValueError(
                f"LPM diagnostics: task {i}'s adapter or Grams do not cover the merged adapter's layers (merged "
                f"{len(merged)}, adapter {len(task)}, Grams {len(groups)}); recompute the merge chain"
            )
    members: dict[str, list[str]] = {}
    for layer, group in maps[-1].items():
        if layer in merged:
            members.setdefault(group, []).append(layer)
    out: dict[str, Any] = {}
    for group, layers in members.items():
        by_key: dict[tuple[str, ...], list[str]] = {}  # layers that read one tensor in every task's Grams file
        for layer in layers:
            by_key.setdefault(tuple(groups[layer] for groups in maps), []).append(layer)
        results: dict[str, LayerDiagnostics] = {}
        for keys, names in by_key.items():
            results |= group_diagnostics(
                {layer: merged[layer] for layer in names},
                [{layer: task[layer] for layer in names} for task in tasks],
                (_grams(path, key) for path, key in zip(grams_files, keys)),
            )
        out[group] = {
            "layers": layers,
            "fit_error": {layer: results[layer].fit_error for layer in layers},
            "leakage": {layer: results[layer].leakage for layer in layers},
            "energy": {layer: results[layer].energy for layer in layers},
        }
    return {"format": FORMAT, "tasks": len(tasks), "groups": out}


__all__ = ["FORMAT", "LayerDiagnostics", "diagnose", "group_diagnostics", "inner_products", "layer_diagnostics"]
