"""What LPM (many.lpm) accepts, checked in one place: every error names the layer (or input group) and the problem.

A task's inputs for one layer are a LoRA, lora_B (out, r) and lora_A (r, in) with r ≥ 1 and a finite scale, and the
Gram of the layer's inputs, (in, in); all finite, converted to float64. A state (C, B, AG or R, γ, tasks) has C (in, in),
B (out, Σr) and AG (Σr, in) (thin) or R (in, out) (dense), γ ≥ 0, tasks ≥ 1. Layers merged as one input group share one C, γ and task count, and a
task brings a LoRA for exactly the layers the state holds. The merge stage's planner (tasks.merge.plan_groups) and
`many.lpm.absorb_model` check a whole model's layer names with the same `model_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

_F64 = torch.float64


def fail(layer: str, problem: str) -> ValueError:
    return ValueError(f"LPM layer {layer!r}: {problem}")


def all_finite(tensor: Tensor) -> bool:
    """No NaN or Inf in `tensor`. One float64 sum instead of `isfinite`'s three element-wise passes: any NaN or Inf
    makes the sum non-finite, and only a non-finite sum (which huge finite values can also give) is re-checked."""
    return math.isfinite(tensor.sum(dtype=_F64).item()) or bool(torch.isfinite(tensor).all())


def matrix(value: Tensor, name: str, layer: str, device: torch.device | None = None) -> Tensor:
    """`value` as a finite float64 matrix, or a ValueError naming the layer and the problem."""
    if not isinstance(value, Tensor):
        raise fail(layer, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise fail(layer, f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if not all_finite(value):
        raise fail(layer, f"{name} contains NaN or Inf")
    return value.to(device=device, dtype=_F64)


def lora(
    lora_B: Tensor, lora_A: Tensor, scale: float, layer: str, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """One task's (B (out, r), A (r, in)) of one layer, validated against each other and converted to float64."""
    B = matrix(lora_B, "lora_B", layer, device)
    A = matrix(lora_A, "lora_A", layer, device)
    if B.shape[1] == 0 or A.shape[0] == 0:
        raise fail(layer, f"rank 0 (lora_B {tuple(B.shape)}, lora_A {tuple(A.shape)}): a LoRA needs rank ≥ 1")
    if B.shape[1] != A.shape[0]:
        raise fail(layer, f"lora_B {tuple(B.shape)} and lora_A {tuple(A.shape)} have different ranks")
    if B.shape[0] == 0 or A.shape[1] == 0:
        raise fail(layer, f"empty layer (lora_B {tuple(B.shape)}, lora_A {tuple(A.shape)})")
    if not math.isfinite(scale):
        raise fail(layer, f"scale must be finite, got {scale}")
    return B, A


def gram_shape(G: Tensor, A: Tensor, layer: str) -> None:
    n = A.shape[1]
    if G.shape != (n, n):
        raise fail(layer, f"gram has shape {tuple(G.shape)}, expected ({n}, {n}) to match lora_A {tuple(A.shape)}")


def task(
    lora_B: Tensor, lora_A: Tensor, scale: float, gram: Tensor, layer: str, device: torch.device | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One task's (B, A, G) validated against each other and converted to float64."""
    B, A = lora(lora_B, lora_A, scale, layer, device)
    G = matrix(gram, "gram", layer, device)
    gram_shape(G, A, layer)
    return B, A, G


def tasks(
    loras: Sequence[tuple[Tensor, Tensor, float]], grams: Sequence[Tensor], layer: str
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Every task's (B, A, G) of one layer (`task`), at least one, all of one out×in shape."""
    if len(loras) == 0:
        raise fail(layer, "no tasks to merge (empty task list)")
    if len(loras) != len(grams):
        raise fail(layer, f"{len(loras)} LoRAs but {len(grams)} Grams")
    checked = [task(B, A, scale, G, layer) for (B, A, scale), G in zip(loras, grams)]
    shapes = {(B.shape[0], A.shape[1]) for B, A, _ in checked}
    if len(shapes) > 1:
        raise fail(layer, f"tasks disagree on the layer's out×in shape: {sorted(shapes)}")
    return checked


def state(layer_state: Any) -> None:
    """A LayerState's fields: C (in, in) and either B (out, Σr), AG (Σr, in) (thin) or R (in, out) with its Σr
    `dense_rank` ≥ 1 (dense; at the step that formed R, also the B and AG it was formed from), float64 matrices;
    γ finite ≥ 0, tasks ≥ 1."""
    problems = []
    thin = layer_state.R is None
    names = ("C", "B", "AG") if thin else ("C", "R")
    for name in names:
        value = getattr(layer_state, name)
        if not isinstance(value, Tensor) or value.ndim != 2 or value.dtype != _F64:
            problems.append(f"{name} must be a 2-D float64 tensor")
    if thin and layer_state.dense_rank is not None:
        problems.append("dense_rank belongs to a dense state (R); a thin one has B and AG")
    switched = not thin and (layer_state.B is not None or layer_state.AG is not None)  # R formed this step
    if switched:
        problems += [f"{name} must be a 2-D float64 tensor" for name in ("B", "AG")
                     if not isinstance(getattr(layer_state, name), Tensor) or getattr(layer_state, name).ndim != 2
                     or getattr(layer_state, name).dtype != _F64]
    if not thin and not (isinstance(layer_state.dense_rank, int) and layer_state.dense_rank >= 1):
        problems.append(f"a dense state needs its Σr as dense_rank ≥ 1, got {layer_state.dense_rank!r}")
    if not problems:
        n = layer_state.C.shape[0]
        if thin:
            out, rank = layer_state.B.shape
            expected = {"C": (n, n), "B": (out, rank), "AG": (rank, n)}
        else:
            out = layer_state.R.shape[1]
            expected = {"C": (n, n), "R": (n, out)}
            if switched:  # the thin factors R was formed from: R = AGᵀBᵀ
                expected |= {"B": (out, layer_state.dense_rank), "AG": (layer_state.dense_rank, n)}
        problems += [
            f"{name} has shape {tuple(getattr(layer_state, name).shape)}, expected {shape}"
            for name, shape in expected.items()
            if tuple(getattr(layer_state, name).shape) != shape
        ]
    if not (math.isfinite(layer_state.gamma) and layer_state.gamma >= 0):
        problems.append(f"gamma must be finite and ≥ 0, got {layer_state.gamma}")
    if layer_state.tasks < 1:
        problems.append(f"tasks must be ≥ 1, got {layer_state.tasks}")
    if problems:
        raise ValueError("LayerState: " + "; ".join(problems))


def shared(states: Mapping[str, Any], group: str) -> Any:
    """The first state of a group, after checking that all of them share one C tensor, γ and task count."""
    if not states:
        raise fail(group, "the group holds no layers")
    first_name, first = next(iter(states.items()))
    for name, state in states.items():
        if state.C is not first.C or state.gamma != first.gamma or state.tasks != first.tasks:
            raise fail(
                group,
                f"the states of {first_name!r} and {name!r} do not share one C, γ and task count; only layers "
                "merged together from one Gram (absorb_group) form a group",
            )
    return first


def group_fits(states: Mapping[str, Any] | None, loras: Mapping[str, Any], group: str) -> Any:
    """A task's LoRAs for an input group fit the group's states (None for the first task): LoRAs for exactly the
    layers the state holds, which share one C. Returns the shared state, or None."""
    if not loras:
        raise fail(group, "the group has no LoRA layers")
    if states is None:
        return None
    if set(states) != set(loras):
        raise fail(group, f"the group's state holds layers {sorted(states)} but the task has LoRAs for {sorted(loras)}")
    return shared(states, group)


def task_fits(G: Tensor, factors: Mapping[str, tuple[Tensor, Tensor]], states: Mapping[str, Any] | None) -> None:
    """Each layer's (B, A) of a task is as wide as the group's Gram G and, after the first task, as its state."""
    for name, (B, A) in factors.items():
        gram_shape(G, A, name)
        if states is not None and (states[name].out_features, states[name].in_features) != (B.shape[0], A.shape[1]):
            raise fail(
                name,
                f"task is {B.shape[0]}×{A.shape[1]} (out×in) but the state holds a "
                f"{states[name].out_features}×{states[name].in_features} layer",
            )


def model_layers(layers: Collection[str], gram_layers: Collection[str], state_layers: Collection[str] | None) -> None:
    """A task's LoRA `layers` (PEFT module names), the layers with a Gram and, after the first task, the layers of
    the merge state: some LoRA layers, each with a Gram (there may be more Grams), exactly the state's layers."""
    if not layers:
        raise ValueError("LPM: the task has no LoRA layers")
    no_gram = sorted(set(layers) - set(gram_layers))
    if no_gram:
        raise ValueError(f"LPM: missing Grams for layers {no_gram}")
    if state_layers is not None:
        no_state = sorted(set(layers) - set(state_layers))
        no_lora = sorted(set(state_layers) - set(layers))
        if no_state or no_lora:
            raise ValueError(
                f"LPM: the task's LoRA layers and the merge state differ: missing states for {no_state}, "
                f"missing LoRAs for {no_lora}"
            )


def to_truncate(B: Tensor, A: Tensor, rank: int, layer: str) -> tuple[Tensor, Tensor]:
    """A LoRA's B (out, r) and A (r, in) to truncate to `rank` ≥ 1, as float64."""
    B = matrix(B, "B", layer)
    A = matrix(A, "A", layer)
    if B.shape[1] != A.shape[0]:
        raise fail(layer, f"B {tuple(B.shape)} and A {tuple(A.shape)} have different ranks")
    if rank < 1:
        raise fail(layer, f"truncation rank must be ≥ 1, got {rank}")
    return B, A
