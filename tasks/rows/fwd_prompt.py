"""Fwd-Prompt (docs/design.md §1 "Comparison methods"; many.methods.fwd_prompt): prompt tuning with gradients
projected away from the old tasks' subspaces, a chain like SeqLoRA (link t continues the prompts and core of link
t−1); at test time the prompts go in front of every test prompt. Opt-in: it trains once more per task."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from many.config import Frozen
from many.methods.fwd_prompt import FwdPromptConfig
from tasks.progress import step_reporter
from tasks.rows import parts
from tasks.rows.row import Chain, EvalContext, PerTask, Row
from tasks.stages import load_base


class FwdPromptStageConfig(Frozen):
    fwd_prompt: FwdPromptConfig
    dtype: str = "float32"


def compute_fwd_prompt(inputs: dict[str, Path], workdir: Path, *, config: FwdPromptStageConfig, device: str) -> dict[str, Path]:
    """fwd_prompt[t]: the prompts and core after task t, continuing `previous` (fwd_prompt[t−1]), and the prompts'
    loss curve; no samples kept."""
    from many.data import read_task
    from many.methods.fwd_prompt import load_state, save_state, train_task
    from many.progress import LossCurve, fan_out

    model, processor = load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    previous = load_state(inputs["previous"]) if "previous" in inputs else None
    curve = LossCurve()
    state = train_task(model, processor, task.train, previous, config.fwd_prompt, progress=False,
                       on_step=fan_out(curve, step_reporter()))
    save_state(state, workdir / "state")
    return {"state": workdir / "state", "losses": curve.write(workdir / "losses.parquet")}


def _link(t: int, shared: PerTask, links: list[Any]) -> dict[str, tuple[Any, str]]:
    upstream = {"base": (shared.base, "model"), "data": (shared.data[t], "task")}
    if t:
        upstream["previous"] = (links[t - 1], "state")
    return upstream


CHAIN = Chain(
    stage="fwd_prompt",
    version="2",  # 2: `losses`
    outputs=("state", "losses"),
    read="state",
    method="fwd_prompt",
    group="finetune",
    needs=frozenset(),
    config=lambda config, task: FwdPromptStageConfig(fwd_prompt=config.fwd_prompt, dtype=config.base.dtype),
    link=_link,
    compute=compute_fwd_prompt,
)


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    from many.evaluate import evaluate
    from many.methods.fwd_prompt import load_state, prompted_model, prompted_samples

    state = load_state(ctx.inputs.chain[-1])
    model, prompted = prompted_model(ctx.base_model, ctx.processor, state)
    n = state.prompts.shape[0]
    results = [evaluate(model, prompted, replace(task, test=prompted_samples(task.test, n)), ctx.config.eval,
                        on_batch=ctx.on_batch)
               for task in ctx.tasks]
    # the prompts (n, d) are the only trained tensor and all the model keeps; the core basis is computed, not
    # trained, and kept only for training the next task
    return results, {**parts.footprint(state.prompts.numel(), state.prompts.numel() * 4, len(ctx.tasks)),
                     "core_dims": state.core.shape[1]}


ROW = Row(
    name="fwd_prompt",
    summary="Fwd-Prompt: prompt tuning with projected gradients, a chain like SeqLoRA (opt-in)",
    evaluate=evaluate,
    chain=CHAIN,
    default=False,
)
