"""The batch merge baselines as rows (docs/design.md §1 "Comparison methods"): at every t, the adapters of tasks ≤ t
merged by one of many.merging's mergers (RegMean also reads their Grams), with the averaged projector.

Each baseline's module is two lines: its chain `merge_<name>` and its row, made here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from many.inference import Recipe
from tasks.rows import parts
from tasks.rows.row import Chain, EvalContext, PerTask, Row, indexed, indexed_paths


def compute_batch_merge(inputs: dict[str, Path], workdir: Path, *, config: Any, method: str) -> dict[str, Path]:
    """merge_<method>[t]: the batch merge of the adapters finetune_0 … finetune_t (and Grams stats_0 … stats_t)."""
    from many.merging import merge_model
    from many.stats import load_grams

    per_task = [parts.task_deltas(path) for path in indexed_paths(inputs, "finetune")]
    deltas = {module: [task[module] for task in per_task] for module in per_task[0]}
    grams = None
    stats = indexed_paths(inputs, "stats")
    if stats:
        per_task_grams = [load_grams(path) for path in stats]
        grams = {module: [g[module] for g in per_task_grams] for module in deltas}
    return {"deltas": save_deltas(merge_model(method, deltas, grams, config), workdir)}


def save_deltas(merged: Mapping[str, Any], workdir: Path) -> Path:
    """A batch merge's output: {PEFT module name: M (out, in)} float32 in workdir/deltas.safetensors."""
    from safetensors.torch import save_file

    path = workdir / "deltas.safetensors"
    save_file({k: v.to("cpu").float().contiguous() for k, v in merged.items()}, str(path))
    return path


def batch_chain(method: str, *, grams: bool = False) -> Chain:
    """The chain merge_<method>: link t merges tasks ≤ t from scratch (no link reads another)."""

    def link(t: int, shared: PerTask, links: list[Any]) -> dict[str, tuple[Any, str]]:
        upstream = indexed("finetune", shared.finetune[: t + 1], "task")
        if grams:
            upstream |= indexed("stats", shared.stats[: t + 1], "grams")
        return upstream

    return Chain(
        stage=f"merge_{method}",
        version="1",
        outputs=("deltas",),
        read="deltas",
        method=method,
        group="merge",
        needs=frozenset({"finetune", "stats"} if grams else {"finetune"}),
        config=lambda config, task: getattr(config.merging, method),
        link=link,
        compute=lambda inputs, workdir, *, config, device: compute_batch_merge(inputs, workdir, config=config, method=method),
    )


def merged_deltas(ctx: EvalContext) -> dict[str, Any]:
    """The merged ΔW per PEFT module name of link t."""
    from safetensors.torch import load_file

    return load_file(str(ctx.inputs.chain[-1]))


def routed_evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    """The eval of a batch-merged update with the tasks' projectors routed by CPM (MAny without LPM, MAny-XL)."""
    return parts.routed_scores(ctx, merged_deltas(ctx))


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    from many.evaluate import Assembly

    assembly = Assembly(merged_deltas(ctx), (parts.averaged_projector(ctx.inputs.finetune),))
    kept = parts.stored(ctx.inputs.chain[-1])[1] + parts.projector_bytes(ctx.inputs.finetune[0])  # dense ΔW, one projector
    return parts.score(ctx, [assembly] * len(ctx.tasks)), parts.task_adapters_footprint(ctx, kept)


def batch_row(chain: Chain, summary: str) -> Row:
    """The row of a batch merge: its merged ΔW with the averaged projector."""
    return Row(name=chain.method, summary=summary, evaluate=evaluate, reads=frozenset({"finetune"}), chain=chain,
               recipe=Recipe(update="merged", projector="average"))
