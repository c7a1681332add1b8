"""Individual (docs/design.md §1): each test task answered by its own LoRA and projector — the task-id oracle,
the upper bound every merge is measured against."""

from __future__ import annotations

from typing import Any

from many.inference import Recipe
from tasks.rows import parts
from tasks.rows.row import EvalContext, Row


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    kept = sum(parts.stored(task_dir)[1] for task_dir in ctx.inputs.finetune)
    return (parts.score(ctx, [parts.own(task_dir) for task_dir in ctx.inputs.finetune]),
            parts.task_adapters_footprint(ctx, kept))


ROW = Row(
    name="individual",
    summary="each task's own adapter and projector (task-id oracle, upper bound)",
    evaluate=evaluate,
    reads=frozenset({"finetune"}),
    recipe=Recipe(update="task", projector="own"),
)
