"""Every stage kind the pipeline runs (docs/design.md §2): the shared stages (tasks.stages), the eval stage
(tasks.evaluation) and every method row's chains (tasks.rows.chains: its own, its extras and the chains they follow)
— by name, with its code version, outputs and compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tasks import evaluation, stages
from tasks.cache import Stage
from tasks.rows import chains


def _kinds() -> dict[str, tuple[str, tuple[str, ...], Callable[..., dict[str, Path]]]]:
    kinds = {name: (stages.VERSIONS[name], stages.OUTPUTS[name], stages.COMPUTES[name]) for name in stages.COMPUTES}
    kinds["eval"] = (evaluation.VERSION, evaluation.OUTPUTS, evaluation.compute_eval)
    for name, chain in chains().items():
        kinds[name] = (chain.version, chain.outputs, chain.compute)
    return kinds


def stage_def(name: str, inputs: Mapping[str, Any]) -> Stage:
    """The Stage of `name` reading exactly these named inputs (lists like finetune_0..t vary with t)."""
    kinds = _kinds()
    if name not in kinds:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(kinds)}")
    version, outputs, _ = kinds[name]
    return Stage(name, version, tuple(sorted(inputs)), outputs)


def compute_of(name: str) -> Callable[..., dict[str, Path]]:
    """The compute function of stage `name`: (local inputs, workdir, *, config, device) → {output: local path}."""
    kinds = _kinds()
    if name not in kinds:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(kinds)}")
    return kinds[name][2]


def recomputable_outputs() -> dict[str, tuple[str, ...]]:
    """{stage: its outputs that only the next link of its chain reads} (Chain.recomputable): what `many gc
    --keep-last` may collect once superseded, and tasks.restore recomputes when a stage needs one again."""
    return {name: chain.recomputable for name, chain in chains().items() if chain.recomputable}
