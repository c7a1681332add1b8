"""MAny-R (issue #16; many.residual, docs/design.md §1.4): MAny's LPM-merged LoRA plus, per task, the rank-k residual
ΔW_i − M_t routed by CPM's weights with the projectors. A default row since it led MAny on every seed and order
(BENCHMARKS.md, quality section).

The chain `residual` follows the LPM chain `merge`: link t reads merge[t]'s adapter and the adapters of tasks ≤ t and
writes, for every task i ≤ t, its residual against M_t per LoRA layer (from the thin factors only: CPU, no data, no
Gram): with k ≥ r_i the task's own factors (form "own": exact, M_t cancels, many.residual), else the rank-k truncated
SVD of ΔW_i − M_t (form "residual"). Its output directory also carries merge[t]'s adapter (`merged/`, the same files,
so the same blobs in the store) so that eval[t] reads one link. eval[t] puts M_t on every layer (none when every
task's residual is its own factors), then mixes the residuals and the projectors of tasks ≤ t per image with one set
of CPM weights.

    residuals/merged/                  merge[t]'s adapter (PEFT, rank Σr)
    residuals/task_<i>.safetensors     "U.<module>" (out, k), "V.<module>" (k, in) float32, i = 0 … t; metadata
                                       "many_residual": {"format", "task", "rank", "form", "error": {module: ‖D − UV‖/‖D‖}}
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from many.config import ResidualConfig
from many.inference import Recipe
from tasks.rows import parts
from tasks.rows.many import LPM_CHAIN
from tasks.rows.row import Chain, EvalContext, PerTask, Row, indexed, indexed_paths

FORMAT = "many.residual/2"  # /2: "form", own factors once k ≥ r_i


def task_file(directory: Path, task: int) -> Path:
    return Path(directory) / f"task_{task}.safetensors"


def compute_residual(inputs: dict[str, Path], workdir: Path, *, config: ResidualConfig, device: str) -> dict[str, Path]:
    """residual[t]: each task's rank-k residual against merge[t] (module doc); CPU, thin factors only."""
    from safetensors.torch import save_file

    from many.adapters import lora_factors
    from many.residual import own_factors, residuals, task_rank

    out = workdir / "residuals"
    shutil.copytree(inputs["merge"], out / "merged")
    merged = {name: (scale * B, A) for name, (B, A, scale) in lora_factors(inputs["merge"]).items()}
    for i, task_dir in enumerate(indexed_paths(inputs, "finetune")):
        task = lora_factors(task_dir / "adapter")
        rank = task_rank(task) if config.rank is None else config.rank
        if rank >= task_rank(task):
            form, factors, errors = "own", own_factors(task), dict.fromkeys(sorted(task), 0.0)
        else:
            form, (factors, errors) = "residual", residuals(task, merged, rank)
        tensors = {f"{kind}.{name}": tensor for name, (U, V) in factors.items() for kind, tensor in (("U", U), ("V", V))}
        metadata = {"format": FORMAT, "task": i, "rank": rank, "form": form, "error": errors}
        save_file(tensors, str(task_file(out, i)), metadata={"many_residual": json.dumps(metadata, sort_keys=True)})
    return {"residuals": out}


def read_residuals(path: Path) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """({module: (U, V)}, metadata) of one task file written by `compute_residual`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as reader:
        metadata = json.loads((reader.metadata() or {}).get("many_residual", "{}"))
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a MAny-R residual file (format {metadata.get('format')!r}, expected {FORMAT!r})")
        names = sorted(key[2:] for key in reader.keys() if key.startswith("U."))
        return {name: (reader.get_tensor(f"U.{name}"), reader.get_tensor(f"V.{name}")) for name in names}, metadata


def exact(scores: dict[str, Any]) -> bool:
    """Whether an eval of this chain (its scores) answered with every task's own factors — the model the row's
    "routed" recipe serves — rather than with truncated residuals."""
    return scores.get("residual_form") != "residual"


def _link(t: int, shared: PerTask, links: list[Any], merges: list[Any]) -> dict[str, tuple[Any, str]]:
    return {"merge": (merges[t], "adapter")} | indexed("finetune", shared.finetune[: t + 1], "task")


RESIDUAL_CHAIN = Chain(
    stage="residual",
    version="2",  # 2: a task keeps its own factors once k ≥ r_i (form "own")
    outputs=("residuals",),
    read="residuals",
    method="many_r",
    group="merge",
    needs=frozenset({"finetune"}),
    config=lambda config, task: config.many_r,
    link=_link,
    compute=compute_residual,
    follows=LPM_CHAIN,
)


def evaluate(ctx: EvalContext) -> tuple[list[Any], dict[str, Any]]:
    from dataclasses import replace

    from many.adapters import lora_factors
    from many.evaluate import lora_deltas

    link = ctx.inputs.chain[-1]
    read = [read_residuals(task_file(link, i)) for i in range(len(ctx.tasks))]
    forms = {metadata["form"] for _, metadata in read}
    if len(forms) > 1:
        raise ValueError(f"{link}: some tasks keep their own factors and some a truncated residual; recompute the "
                         "residual stage with one many_r.rank for the stream's LoRA ranks")
    own = forms == {"own"}  # Σ w_i (ΔW_i − M_t) + M_t = Σ w_i ΔW_i: the merge is not on the layers
    assembly, tau = parts.routed(ctx, {} if own else lora_deltas(lora_factors(link / "merged")))
    assembly = replace(assembly, residuals=tuple(factors for factors, _ in read))
    errors = [e for _, metadata in read for e in metadata["error"].values()]
    residual_bytes = sum(parts.stored(task_file(link, i))[1] for i in range(len(ctx.tasks)))
    merged_bytes = 0 if own else parts.stored(link / "merged")[1]
    return parts.score(ctx, [assembly] * len(ctx.tasks)), {
        "tau": tau, **parts.routed_footprint(ctx, merged_bytes + residual_bytes), "residual_form": forms.pop(),
        "residual_bytes_per_task": residual_bytes // len(ctx.tasks),  # the U, V tensors of one task, on average
        "residual_error": sum(errors) / len(errors),  # mean over tasks and layers of ‖D − UV‖ / ‖D‖
    }


ROW = Row(
    name="many_r",
    summary="MAny-R: the LPM-merged LoRA + per-task rank-k residuals and projectors, both routed by CPM",
    evaluate=evaluate,
    reads=frozenset({"finetune", "prototypes"}),
    chain=RESIDUAL_CHAIN,
    routed=True,
    recipe=Recipe(update="routed", projector="cpm"),  # served in the exact form only (flows.predict, flows.export)
)
