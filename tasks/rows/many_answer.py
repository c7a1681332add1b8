"""MAny-A (issue #16, lever 4a; docs/design.md §1.4): MAny with answer-weighted Grams. Opt-in.

MAny's LPM merge fits each task's update on all of its tokens' inputs, G_i = X_iᵀX_i / N_i (many.stats). The tokens
a task is judged by are its answers, so this row adds, per task, the Gram of the positions that predict an answer
token (the positions the training loss reads, many.loop.answer_positions):

    G_i = G_all,i + λ_i · G_answer,i,        λ_i = many_answer.weight, or many_answer.tasks[task i]

and merges with it exactly as MAny does (C_t = C_{t−1} + G_t, R_t = R_{t−1} + G_t ΔW_tᵀ, M_tᵀ = C_t⁻¹ R_t;
tasks.merge.merge_step). Its eval is MAny's (the merged LoRA, projectors routed by CPM). λ = 0 is MAny's merge
exactly; answer tokens alone (no G_all) are what docs/design.md §8 found to ruin the merge, hence the sum.

The chain `merge_answer`: link t reads the base, task t's data, adapter and all-token Grams, and link t − 1's state;
it collects task t's G_answer under task t's own model (one forward pass over its training samples, as the stats
stage does), merges with G_t above and writes MAny's merge outputs plus G_answer:

    state/, adapter/, export.json      as merge[t] (tasks/merge.py)
    answer_grams.safetensors           G_answer,t in the stats stage's Grams format
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from many.config import AnswerWeightConfig, Frozen, LPMConfig, StatsConfig
from many.inference import Recipe
from tasks.rows import many
from tasks.rows.row import Chain, PerTask, Row


class AnswerMergeStageConfig(Frozen):
    """merge_answer[t]'s settings (its cache key): the LPM merge's, the answer weights, and how Grams are taken."""

    lpm: LPMConfig
    answer: AnswerWeightConfig
    stats: StatsConfig
    dtype: str = "float32"


def weighted_grams(grams: dict[str, Any], answer: dict[str, Any], weight: float) -> dict[str, Any]:
    """{layer: G_all + weight · G_answer} with the layers of one input group sharing one tensor object, as in `grams`
    (ValueError if the two collections group the layers differently)."""
    from many.stats import gram_groups

    if gram_groups(grams) != gram_groups(answer):
        raise ValueError("merge_answer: the answer Grams group the LoRA layers differently from the stats stage's; "
                         "recompute the stats stage (its Grams predate the current grouping)")
    combined: dict[int, Any] = {}
    return {name: combined.setdefault(id(gram), gram + weight * answer[name]) for name, gram in grams.items()}


def compute_merge_answer(inputs: dict[str, Path], workdir: Path, *, config: AnswerMergeStageConfig,
                         device: str) -> dict[str, Path]:
    """merge_answer[t] (module doc): G_answer,t under task t's own model, then MAny's merge step on G_all + λ·G_answer."""
    from many.adapters import load_task
    from many.data import read_task
    from many.stats import collect_grams, load_grams, save_grams
    from tasks.merge import merge_step
    from tasks.progress import batch_reporter
    from tasks.stages import load_base

    model, processor = load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    answer = collect_grams(load_task(model, inputs["finetune"]), processor, task.train, config.stats, tokens="answer",
                           progress=False, on_batch=batch_reporter("batch"))
    del model
    answer_path = save_grams(answer, workdir / "answer_grams.safetensors", config.stats.gram_dtype)
    weighted = workdir / "weighted" / "gram.safetensors"  # the merge's input, not an output
    weighted.parent.mkdir()
    save_grams(weighted_grams(load_grams(inputs["grams"]), load_grams(answer_path), config.answer.weight_of(task.name)),
               weighted, config.stats.gram_dtype)
    outputs = merge_step({**inputs, "grams": weighted}, workdir, config.lpm)
    weighted.unlink()
    weighted.parent.rmdir()
    return {**outputs, "answer_grams": answer_path}


def _link(t: int, shared: PerTask, links: list[Any]) -> dict[str, tuple[Any, str]]:
    upstream = {"base": (shared.base, "model"), "data": (shared.data[t], "task"),
                "finetune": (shared.finetune[t], "task"), "grams": (shared.stats[t], "grams")}
    if t:
        upstream["previous"] = (links[t - 1], "state")
    return upstream


ANSWER_CHAIN = Chain(
    stage="merge_answer",
    version="1",
    outputs=("state", "adapter", "export", "answer_grams"),
    read="adapter",
    method="many_answer",
    group="stats",  # a forward pass over the task's training samples, like the stats stage, then a CPU merge step
    needs=frozenset({"finetune", "stats"}),
    config=lambda config: AnswerMergeStageConfig(lpm=config.lpm, answer=config.many_answer, stats=config.stats,
                                                 dtype=config.base.dtype),
    link=_link,
    compute=compute_merge_answer,
    recomputable=("state",),
)


ROW = Row(
    name="many_answer",
    summary="MAny-A: MAny with answer-weighted Grams, G_all + λ·G_answer, in the LPM merge (opt-in)",
    evaluate=many.evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=ANSWER_CHAIN,
    routed=True,
    default=False,
    recipe=Recipe(update="merged", projector="cpm"),
)
