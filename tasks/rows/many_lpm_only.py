"""MAny without CPM (docs/design.md §1): the LPM-merged LoRA with one averaged projector for every image."""

from __future__ import annotations

from typing import Any

from many.inference import Recipe
from tasks.rows import parts
from tasks.rows.many import DIAGNOSTICS_CHAIN, LPM_CHAIN, lpm_deltas
from tasks.rows.row import EvalContext, Row


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    from many.evaluate import Assembly

    assembly = Assembly(lpm_deltas(ctx), (parts.averaged_projector(ctx.inputs.finetune),))
    kept = parts.stored(ctx.inputs.chain[-1])[1] + parts.projector_bytes(ctx.inputs.finetune[0])  # one projector
    return parts.score(ctx, [assembly] * len(ctx.tasks)), parts.task_adapters_footprint(ctx, kept)


ROW = Row(
    name="many_lpm_only",
    summary="MAny without CPM: the LPM-merged LoRA + the averaged projector",
    evaluate=evaluate,
    reads=frozenset({"finetune"}),
    chain=LPM_CHAIN,
    extras=(DIAGNOSTICS_CHAIN,),
    recipe=Recipe(update="merged", projector="average"),
)
