"""MAny without LPM (docs/design.md §1): the averaged LoRA (the `average` baseline's chain) with CPM routing."""

from __future__ import annotations

from typing import Any

from many.inference import Recipe
from tasks.rows import average, parts
from tasks.rows.batch import merged_deltas
from tasks.rows.row import EvalContext, Row


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    return parts.routed_scores(ctx, merged_deltas(ctx))


ROW = Row(
    name="many_cpm_only",
    summary="MAny without LPM: the averaged LoRA + CPM",
    evaluate=evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=average.CHAIN,
    routed=True,
    recipe=Recipe(update="merged", projector="cpm"),
    default=False,
)
