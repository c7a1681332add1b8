"""MAny-XL (issue #16, lever 4d; many.lpm_crosslayer, docs/design.md §1.4): MAny with cross-layer Grams. Opt-in and
experimental.

The chain `merge_xl`: link t reads the base and the data and adapters of every task ≤ t and merges the input groups
in forward order, each on Grams taken through the merged earlier groups (many.lpm_crosslayer). It is a batch merge:
no link reads another, and link t re-reads every earlier task's training samples (the cost the module doc of
many.lpm_crosslayer spells out). eval[t] is MAny's: the merged update on every layer, the projectors routed by CPM.

    deltas.safetensors   {PEFT module name: M (out, in)} float32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from many.config import Frozen, StatsConfig
from many.inference import Recipe
from tasks.rows import parts
from tasks.rows.batch import routed_evaluate, save_deltas
from tasks.rows.row import Chain, PerTask, Row, indexed, indexed_paths


class CrossLayerStageConfig(Frozen):
    """merge_xl[t]'s settings (its cache key): LPM's a and γ for the solve, how the Grams are taken, the dtype."""

    a: float
    gamma: float
    stats: StatsConfig
    dtype: str = "float32"


def compute_merge_xl(inputs: dict[str, Path], workdir: Path, *, config: CrossLayerStageConfig,
                     device: str) -> dict[str, Path]:
    """merge_xl[t] (module doc): the cross-layer merge of the tasks data_j / finetune_j, j = 0 … t."""
    from many.adapters import projector_state
    from many.config import LPMConfig
    from many.data import read_task
    from many.lpm_crosslayer import TaskParts, cross_layer_merge
    from tasks.progress import batch_reporter
    from tasks.stages import load_base

    model, processor = load_base(inputs["base"], config.dtype, device)
    tasks = [TaskParts(parts.task_deltas(task_dir), projector_state(task_dir), read_task(data).train)
             for data, task_dir in zip(indexed_paths(inputs, "data"), indexed_paths(inputs, "finetune"), strict=True)]
    merged = cross_layer_merge(model, processor, tasks, LPMConfig(a=config.a, gamma=config.gamma), config.stats,
                               on_group=batch_reporter("input group"))
    return {"deltas": save_deltas(merged, workdir)}


def _link(t: int, shared: PerTask, links: list[Any]) -> dict[str, tuple[Any, str]]:
    return ({"base": (shared.base, "model")} | indexed("data", shared.data[: t + 1], "task")
            | indexed("finetune", shared.finetune[: t + 1], "task"))


XL_CHAIN = Chain(
    stage="merge_xl",
    version="1",
    outputs=("deltas",),
    read="deltas",
    method="many_xl",
    group="stats",  # forward passes over the tasks' training samples, as the stats stage
    needs=frozenset({"finetune"}),
    config=lambda config, task: CrossLayerStageConfig(a=config.lpm.a, gamma=config.lpm.gamma, stats=config.stats,
                                                dtype=config.base.dtype),
    link=_link,
    compute=compute_merge_xl,
)


ROW = Row(
    name="many_xl",
    summary="MAny-XL: MAny's merge on Grams taken through the merged earlier layers (opt-in, experimental)",
    evaluate=routed_evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=XL_CHAIN,
    routed=True,
    default=False,
    recipe=Recipe(update="merged", projector="cpm"),
)
