"""CRAM (docs/design.md §1 "Comparison methods"; many.methods.cram): one isolated adaptive-rank LoRA expert per
task, its rank and orthogonality penalty set by the experts before it; at test time each image is answered by the
expert of its nearest task centroid — CPM's prototypes of tasks ≤ t. Opt-in: it trains once more per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from many.config import Frozen
from many.methods.cram import CramConfig
from tasks.progress import step_reporter
from tasks.rows import parts
from tasks.rows.row import Chain, EvalContext, PerTask, Row, indexed, indexed_paths
from tasks.stages import load_base


class CramStageConfig(Frozen):
    cram: CramConfig
    dtype: str = "float32"


def compute_cram(inputs: dict[str, Path], workdir: Path, *, config: CramStageConfig, device: str) -> dict[str, Path]:
    """cram[t]: task t's isolated expert from the base, and its loss curve; its rank and orthogonality penalty read
    the experts of tasks < t (inputs expert_0 … expert_{t−1}), which stay untouched."""
    from many.data import read_task
    from many.methods.cram import save_expert, train_expert
    from many.progress import LossCurve, fan_out

    model, processor = load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    curve = LossCurve()
    expert, allocation = train_expert(model, processor, task.train, config.cram, indexed_paths(inputs, "expert"),
                                      progress=False, on_step=fan_out(curve, step_reporter()))
    save_expert(expert, allocation, workdir / "expert")
    return {"expert": workdir / "expert", "losses": curve.write(workdir / "losses.parquet")}


def _link(t: int, shared: PerTask, links: list[Any]) -> dict[str, tuple[Any, str]]:
    return {"base": (shared.base, "model"), "data": (shared.data[t], "task")} | indexed("expert", links[:t], "expert")


CHAIN = Chain(
    stage="cram",
    version="2",  # 2: `losses`
    outputs=("expert", "losses"),
    read="expert",
    method="cram",
    group="finetune",
    needs=frozenset(),
    config=lambda config, task: CramStageConfig(cram=config.cram, dtype=config.base.dtype),
    link=_link,
    compute=compute_cram,
)


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    from many.methods.cram import evaluate_cram, load_expert, trainable_parameters
    from many.prototypes import read_prototypes

    experts = [load_expert(path) for path in ctx.inputs.chain]
    if ctx.config.cpm is None:  # CRAM's own routing: the cosine to the centroids
        _, centroids, _ = read_prototypes(list(ctx.inputs.prototypes))
        precision = None
    else:  # a routed variant (cram_lda): the argmax of the CPM router's weights
        from many.evaluate import cpm_router

        router = cpm_router(list(ctx.inputs.prototypes), ctx.config.cpm)
        centroids, precision = router.prototypes, router.precision
    results = evaluate_cram(ctx.base_model, ctx.processor, list(ctx.tasks), experts, centroids, ctx.config.eval,
                            on_batch=ctx.on_batch, precision=precision)
    per_task = [trainable_parameters(expert)["total"] for expert in experts]
    kept = sum(parts.stored(path)[1] for path in ctx.inputs.chain) + parts.prototype_bytes(ctx)  # experts, centroids
    return results, {**parts.footprint(sum(per_task), kept, len(ctx.tasks)), "parameters_per_task": per_task,
                     "ranks": [expert.allocation.rank for expert in experts]}


ROW = Row(
    name="cram",
    summary="CRAM: task-isolated adaptive-rank LoRA experts, centroid routing (opt-in)",
    evaluate=evaluate,
    reads=frozenset({"prototypes"}),
    chain=CHAIN,
    chain_links="all",
    default=False,
)
