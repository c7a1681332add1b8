"""SeqLoRA (docs/design.md §1): one LoRA and projector trained task after task, each link continuing the
previous one — the forgetting lower bound. Its first link is exactly finetune[0]."""

from __future__ import annotations

from typing import Any

from many.inference import Recipe
from tasks.rows import parts
from tasks.rows.row import Chain, EvalContext, PerTask, Reuse, Row
from tasks.stages import FinetuneStageConfig, compute_finetune


def _link(t: int, shared: PerTask, links: list[Any]) -> dict[str, tuple[Any, str]] | Reuse:
    if t == 0:
        return Reuse(shared.finetune[0])
    return {"base": (shared.base, "model"), "data": (shared.data[t], "task"), "previous": (links[t - 1], "task")}


CHAIN = Chain(
    stage="seqlora",
    version="3",  # 2: the adapter files hold no local path (identical bytes on every machine); 3: `losses`
    outputs=("task", "losses"),
    read="task",
    method="seqlora",
    group="finetune",
    needs=frozenset({"finetune"}),
    config=lambda config, task: FinetuneStageConfig(finetune=config.finetune, dtype=config.base.dtype),
    link=_link,
    compute=compute_finetune,  # with a `previous` input it continues that task directory
)


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    elements, kept = parts.stored(ctx.inputs.chain[-1])  # one LoRA + projector, trained through every task
    return (parts.score(ctx, [parts.own(ctx.inputs.chain[-1])] * len(ctx.tasks)),
            parts.footprint(elements, kept, len(ctx.tasks)))


ROW = Row(
    name="seqlora",
    summary="one LoRA trained task after task (lower bound)",
    evaluate=evaluate,
    chain=CHAIN,
    recipe=Recipe(update="merged", projector="own"),
)
