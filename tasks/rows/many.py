"""MAny (docs/design.md §1): the LoRAs merged by LPM, the projectors mixed per image by CPM.

The LPM chain `merge` folds task t into the RLS state of tasks < t,

    C_t = C_{t−1} + G̃_t,   R_t = R_{t−1} + G̃_t ΔW_tᵀ,   M_tᵀ = C_t⁻¹ R_t,
    G_t = G_all,t + λ_t·G_answer,t      (stats[t]'s two Grams; λ_t: lpm.answer, 1 by default; λ = 0: `many_all`)

and exports M_t as a rank-Σr PEFT adapter (tasks/merge.py fans the input groups out over Ray). eval[t] puts M_t
on every layer and routes each test image's visual tokens through the projectors of tasks ≤ t by CPM.

The chain `merge_diagnostics` follows it (an extra of the `many` and `many_lpm_only` rows, off with
`lpm.diagnostics: false`): link t reads merge[t]'s adapter and the adapters and all-token Grams of tasks ≤ t (the
error over every token the layer sees, not the weighted Gram the merge fits), and writes each layer's fit error e_i
and leakage ℓ_ij (many.lpm_diagnostics); `many report` shows the last link's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from many.config import Frozen
from many.inference import Recipe
from tasks.rows import parts
from tasks.rows.row import Chain, EvalContext, PerTask, Row, indexed, indexed_paths


def compute_merge(inputs: dict[str, Path], workdir: Path, *, config: Any, device: str) -> dict[str, Path]:
    """merge[t]: fold task t into the RLS state of tasks < t and export the merge as a PEFT adapter (exact, or
    truncated to lpm.rank), with export.json saying per layer the state's form, Σr and the export's error.

    One job per input group (the LoRA layers sharing one Gram, hence one C): read its Gram and previous state file,
    absorb, export, write its new state file. In a Ray worker the jobs fan out as 1-CPU Ray tasks pinned to this
    node, where the inputs and the workdir are local files; outside Ray they run one after another, with the same
    bytes. Peak memory: concurrent jobs × one group.
    """
    from tasks.merge import merge_step

    return merge_step(inputs, workdir, config)


def lpm_link(t: int, shared: PerTask, links: list[Any], answer: bool = True) -> dict[str, tuple[Any, str]]:
    """merge[t]'s inputs: task t's adapter and Grams (its answer Grams too, unless `answer` is False: the λ = 0 chain
    of `many_all`), and link t − 1's state."""
    upstream = {"finetune": (shared.finetune[t], "task"), "grams": (shared.stats[t], "grams")}
    if answer:
        upstream["answer_grams"] = (shared.stats[t], "answer_grams")
    if t:
        upstream["previous"] = (links[t - 1], "state")
    return upstream


LPM_CHAIN = Chain(
    stage="merge",
    version="5",  # 3: one state file per input group (C once, no R), groups fanned out over Ray on the node;
    # 4: a layer's state turns dense (C, R) once smaller than the thin factors (group format /2), export.json;
    # 5: G_t = G_all,t + λ_t·G_answer,t (lpm.answer)
    outputs=("state", "adapter", "export"),
    read="adapter",
    method="many",
    group="merge",
    needs=frozenset({"finetune", "stats"}),
    config=lambda config, task: config.lpm.for_task(task),
    link=lpm_link,
    compute=compute_merge,
    recomputable=("state",),  # read only by merge[t + 1]: superseded states are collected, recomputed on demand
)


class DiagnosticsStageConfig(Frozen):
    """merge_diagnostics[t] has no setting: its key is its inputs' digests and its code version."""


def compute_diagnostics(inputs: dict[str, Path], workdir: Path, *, config: Any, device: str) -> dict[str, Path]:
    """merge_diagnostics[t]: diagnostics.json (many.lpm_diagnostics.diagnose) of merge[t]'s adapter ("merge"), from
    the task dirs finetune_0 … finetune_t and Grams stats_0 … stats_t. One Gram in memory at a time; CPU."""
    from many.lpm_diagnostics import diagnose

    result = diagnose(inputs["merge"], indexed_paths(inputs, "finetune"), indexed_paths(inputs, "stats"))
    path = workdir / "diagnostics.json"
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return {"diagnostics": path}


def _diagnostics_link(t: int, shared: PerTask, links: list[Any], merges: list[Any]) -> dict[str, tuple[Any, str]]:
    return ({"merge": (merges[t], "adapter")} | indexed("finetune", shared.finetune[: t + 1], "task")
            | indexed("stats", shared.stats[: t + 1], "grams"))


DIAGNOSTICS_CHAIN = Chain(
    stage="merge_diagnostics",
    version="1",
    outputs=("diagnostics",),
    read="diagnostics",  # read by the report (flows/report.py), not by an eval
    method="many",
    group="merge",
    needs=frozenset({"finetune", "stats"}),
    config=lambda config, task: DiagnosticsStageConfig(),
    link=_diagnostics_link,
    compute=compute_diagnostics,
    follows=LPM_CHAIN,
    enabled=lambda config: config.lpm.diagnostics,
)


def lpm_deltas(ctx: EvalContext) -> dict[str, Any]:
    """M_t per PEFT module name, from the merged adapter of link t."""
    from many.adapters import lora_factors
    from many.evaluate import lora_deltas

    return lora_deltas(lora_factors(ctx.inputs.chain[-1]))


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    return parts.routed_scores(ctx, lpm_deltas(ctx))


ROW = Row(
    name="many",
    summary="MAny: LPM (RLS merge of the LoRAs) + CPM (per-image routed projectors)",
    evaluate=evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=LPM_CHAIN,
    routed=True,
    extras=(DIAGNOSTICS_CHAIN,),
    recipe=Recipe(update="merged", projector="cpm"),
)
