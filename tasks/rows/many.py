"""MAny (docs/design.md §1): the LoRAs merged by LPM, the projectors mixed per image by CPM.

The LPM chain `merge` folds task t into the RLS state of tasks < t,

    C_t = C_{t−1} + G̃_t,   R_t = R_{t−1} + G̃_t ΔW_tᵀ,   M_tᵀ = C_t⁻¹ R_t,

and exports M_t as a rank-Σr PEFT adapter (tasks/merge.py fans the input groups out over Ray). eval[t] puts M_t
on every layer and routes each test image's visual tokens through the projectors of tasks ≤ t by CPM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from many.inference import Recipe
from tasks.rows import parts
from tasks.rows.row import Chain, EvalContext, PerTask, Row


def compute_merge(inputs: dict[str, Path], workdir: Path, *, config: Any, device: str) -> dict[str, Path]:
    """merge[t]: fold task t into the RLS state of tasks < t and export the merge as a rank-Σr PEFT adapter.

    One job per input group (the LoRA layers sharing one Gram, hence one C): read its Gram and previous state file,
    absorb, export, write its new state file. In a Ray worker the jobs fan out as 1-CPU Ray tasks pinned to this
    node, where the inputs and the workdir are local files; outside Ray they run one after another, with the same
    bytes. Peak memory: concurrent jobs × one group.
    """
    from tasks.merge import merge_step

    return merge_step(inputs, workdir, config)


def _link(t: int, shared: PerTask, links: list[Any]) -> dict[str, tuple[Any, str]]:
    upstream = {"finetune": (shared.finetune[t], "task"), "grams": (shared.stats[t], "grams")}
    if t:
        upstream["previous"] = (links[t - 1], "state")
    return upstream


LPM_CHAIN = Chain(
    stage="merge",
    version="3",  # 3: one state file per input group (C once, no R), groups fanned out over Ray on the node
    outputs=("state", "adapter"),
    read="adapter",
    method="many",
    group="merge",
    needs=frozenset({"finetune", "stats"}),
    config=lambda config: config.lpm,
    link=_link,
    compute=compute_merge,
)


def lpm_deltas(ctx: EvalContext) -> dict[str, Any]:
    """M_t per PEFT module name, from the merged adapter of link t."""
    from many.adapters import lora_factors
    from many.evaluate import lora_deltas

    return lora_deltas(lora_factors(ctx.inputs.chain[-1]))


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    assembly, tau = parts.routed(ctx, lpm_deltas(ctx))
    return parts.score(ctx, [assembly] * len(ctx.tasks)), {"tau": tau}


ROW = Row(
    name="many",
    summary="MAny: LPM (RLS merge of the LoRAs) + CPM (per-image routed projectors)",
    evaluate=evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=LPM_CHAIN,
    routed=True,
    recipe=Recipe(update="merged", projector="cpm"),
)
