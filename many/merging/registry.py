"""The registry of merge baselines (see many.merging): MERGERS, CONFIGS, and the validating entry points
`merge_layer` and `merge_model`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from many.config import Frozen
from many.merging import average, regmean, task_arithmetic, ties

Merger = Callable[[Sequence[Tensor], Sequence[Tensor] | None, Frozen], Tensor]

MERGERS: dict[str, Merger] = {
    "average": average.merge,
    "task_arithmetic": task_arithmetic.merge,
    "ties": ties.merge,
    "regmean": regmean.merge,
}
CONFIGS: dict[str, type[Frozen]] = {
    "average": average.AverageConfig,
    "task_arithmetic": task_arithmetic.TaskArithmeticConfig,
    "ties": ties.TiesConfig,
    "regmean": regmean.RegMeanConfig,
}


def get_merger(name: str) -> Merger:
    """The registered merger called `name`."""
    if name not in MERGERS:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(MERGERS))}")
    return MERGERS[name]


def _config(name: str, cfg: Frozen | None) -> Frozen:
    """`cfg`, or the method's defaults when None; a config of another method is an error."""
    expected = CONFIGS[name]
    if cfg is None:
        return expected()
    if not isinstance(cfg, expected):
        raise ValueError(f"merge method {name!r} takes a {expected.__name__}, got {type(cfg).__name__}")
    return cfg


def _check_layer(layer: str, deltas: Sequence[Tensor], grams: Sequence[Tensor] | None) -> None:
    """Raise ValueError naming `layer` (and the task index) for inputs no merger can use."""
    if len(deltas) == 0:
        raise ValueError(f"layer {layer!r}: no task deltas to merge (need at least one task)")
    shape = tuple(deltas[0].shape)
    if len(shape) != 2:
        raise ValueError(f"layer {layer!r}: task 0 delta has shape {shape}; expected a 2-D (out, in) matrix")
    for i, delta in enumerate(deltas):
        if tuple(delta.shape) != shape:
            raise ValueError(
                f"layer {layer!r}: task {i} delta has shape {tuple(delta.shape)}, task 0 has {shape}; "
                f"all tasks must share the layer's (out, in) shape"
            )
        if not torch.isfinite(delta).all():
            raise ValueError(f"layer {layer!r}: task {i} delta contains NaN/Inf; check that task's adapter")
    if grams is None:
        return
    if len(grams) != len(deltas):
        raise ValueError(f"layer {layer!r}: {len(grams)} Grams for {len(deltas)} task deltas; need one per task")
    for i, gram in enumerate(grams):
        if tuple(gram.shape) != (shape[1], shape[1]):
            raise ValueError(
                f"layer {layer!r}: task {i} Gram has shape {tuple(gram.shape)}; expected (in, in) = "
                f"{(shape[1], shape[1])} to match the delta"
            )
        if not torch.isfinite(gram).all():
            raise ValueError(f"layer {layer!r}: task {i} Gram contains NaN/Inf; recompute that task's stats")


def merge_layer(
    name: str,
    deltas: Sequence[Tensor],
    grams: Sequence[Tensor] | None = None,
    cfg: Frozen | None = None,
    layer: str = "<layer>",
) -> Tensor:
    """Validate one layer's T deltas (out, in) and Grams (in, in), then merge them with method `name`."""
    merger = get_merger(name)
    config = _config(name, cfg)
    _check_layer(layer, deltas, grams)
    try:
        return merger(deltas, grams, config)
    except ValueError as error:
        raise ValueError(f"layer {layer!r}: {error}") from error


def merge_model(
    name: str,
    deltas: Mapping[str, Sequence[Tensor]],
    grams: Mapping[str, Sequence[Tensor]] | None = None,
    cfg: Frozen | None = None,
) -> dict[str, Tensor]:
    """Merge every layer: {PEFT module name: T deltas (out, in)} → {module name: merged (out, in)}."""
    if not deltas:
        raise ValueError(f"merge_model({name!r}): no layers to merge (the deltas dict is empty)")
    counts = {layer: len(per_task) for layer, per_task in deltas.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"merge_model({name!r}): layers have different task counts {counts}; expected the same tasks")
    if grams is not None and set(grams) != set(deltas):
        only_deltas = sorted(set(deltas) - set(grams))
        only_grams = sorted(set(grams) - set(deltas))
        raise ValueError(
            f"merge_model({name!r}): delta and Gram layers differ — only in deltas: {only_deltas}; "
            f"only in grams: {only_grams}"
        )
    return {
        layer: merge_layer(name, per_task, None if grams is None else grams[layer], cfg, layer=layer)
        for layer, per_task in deltas.items()
    }
