"""A toy method row for the registry tests: the base model alone — no LoRA, the base's own projector, nothing read
per task. Loaded through $MANY_ROWS, as a row kept outside the package would be."""

from __future__ import annotations

from typing import Any

from tasks.rows import parts
from tasks.rows.row import EvalContext, Row


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    from many.evaluate import Assembly

    return parts.score(ctx, [Assembly()] * len(ctx.tasks)), {}


ROW = Row(name="base_only", summary="the base model alone (toy row of the tests)", evaluate=evaluate, default=False)
