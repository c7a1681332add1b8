"""MAny without LPM (docs/design.md §1): the averaged LoRA (the `average` baseline's chain) with CPM routing."""

from __future__ import annotations

from many.inference import Recipe
from tasks.rows import average
from tasks.rows.batch import routed_evaluate
from tasks.rows.row import Row

ROW = Row(
    name="many_cpm_only",
    summary="MAny without LPM: the averaged LoRA + CPM",
    evaluate=routed_evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=average.CHAIN,
    routed=True,
    recipe=Recipe(update="merged", projector="cpm"),
    default=False,
)
