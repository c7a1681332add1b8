"""The pieces rows build their models from (docs/design.md §1, §10): a task's own LoRA and projector, the averaged
projector, CPM routing over the tasks ≤ t, the loop that scores one Assembly per test task, and what a row reports
of its size (`footprint`: trainable parameters, bytes stored per task).

Everything here reads local copies of stage outputs (paths) and calls `many`; nothing knows a method's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.rows.row import EvalContext


def task_deltas(task_dir: Path) -> dict[str, Any]:
    """ΔW = s·B A (out, in) per PEFT module name of a task directory's adapter."""
    from many.adapters import lora_factors
    from many.evaluate import lora_deltas

    return lora_deltas(lora_factors(task_dir / "adapter"))


def own(task_dir: Path) -> Any:
    """The Assembly of one task directory: its own LoRA and its own projector."""
    from many.adapters import projector_state
    from many.evaluate import Assembly

    return Assembly(task_deltas(task_dir), (projector_state(task_dir),))


def averaged_projector(task_dirs: Sequence[Path]) -> dict[str, Any]:
    """The element-wise mean of the tasks' projector weights (computed in float64, stored in their dtype)."""
    from many.adapters import projector_state

    states = [projector_state(d) for d in task_dirs]
    return {k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}


def routed(ctx: EvalContext, deltas: Mapping[str, Any]) -> tuple[Any, float]:
    """MAny's assembly at t: `deltas` on every layer and the tasks' own projectors mixed per image by CPM,
    w = softmax(cos(f(x), μ_i) / τ) over the prototypes of tasks ≤ t; returns it with the τ it uses."""
    from many.adapters import projector_state
    from many.config import CPMConfig
    from many.evaluate import Assembly, cpm_router

    router = cpm_router(ctx.inputs.prototypes, ctx.config.cpm or CPMConfig())
    projectors = tuple(projector_state(d) for d in ctx.inputs.finetune)
    return Assembly(deltas, projectors, router), router.tau


def score(ctx: EvalContext, assemblies: Sequence[Any]) -> list[Any]:
    """Score assembly j on test task j (an EvalResult each); one model is built per distinct assembly."""
    from many.evaluate import assemble, evaluate

    results, model, built = [], None, None
    for task, assembly in zip(ctx.tasks, assemblies, strict=True):
        if assembly is not built:
            model, built = assemble(ctx.base_model, assembly), assembly
        results.append(evaluate(model, ctx.processor, task, ctx.config.eval, routing=assembly.router,
                                on_batch=ctx.on_batch))
    return results


def stored(*paths: Path) -> tuple[int, int]:
    """(elements, bytes) of every tensor in the safetensors files at `paths` (files, or directories searched
    recursively), read from the file headers."""
    from safetensors import safe_open

    files = [f for p in map(Path, paths) for f in ([p] if p.is_file() else sorted(p.rglob("*.safetensors")))]
    elements = nbytes = 0
    for path in files:
        with safe_open(str(path), framework="pt") as reader:
            for key in reader.keys():
                view = reader.get_slice(key)
                count = 1
                for size in view.get_shape():
                    count *= size
                elements += count
                nbytes += count * _ITEMSIZE[view.get_dtype()]
    return elements, nbytes


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def projector_bytes(task_dir: Path) -> int:
    from many.adapters import PROJECTOR_FILE

    return stored(Path(task_dir) / PROJECTOR_FILE)[1]


def prototype_bytes(ctx: EvalContext) -> int:
    """The (T, D) float32 prototypes a routed model keeps (one vector per task; the per-image rows are not needed)."""
    from many.prototypes import read_prototypes

    _, prototypes, _ = read_prototypes(ctx.inputs.prototypes)
    return prototypes.numel() * 4


def footprint(trained: int, kept_bytes: int, tasks: int) -> dict[str, int]:
    """A row's size fields of scores.json (docs/design.md §2.1): `trainable_parameters`, every parameter trained by
    gradient over the stream so far, and `bytes_per_task`, the bytes of the tensors the model after the last task
    answers with (adapters, merged updates, projectors, residuals, prototypes, prompts), divided by the tasks."""
    return {"trainable_parameters": trained, "bytes_per_task": kept_bytes // tasks}


def task_adapters_footprint(ctx: EvalContext, kept_bytes: int) -> dict[str, int]:
    """`footprint` of a row built from the per-task fine-tunes (each task's LoRA + projector trained once)."""
    return footprint(sum(stored(d)[0] for d in ctx.inputs.finetune), kept_bytes, len(ctx.tasks))


def routed_footprint(ctx: EvalContext, update_bytes: int) -> dict[str, int]:
    """`task_adapters_footprint` of a CPM-routed row: its LoRA update (`update_bytes`), every task's projector and
    the prototypes that route between them."""
    kept = update_bytes + sum(map(projector_bytes, ctx.inputs.finetune)) + prototype_bytes(ctx)
    return task_adapters_footprint(ctx, kept)


def routed_scores(ctx: EvalContext, deltas: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The eval of a row whose model is one merged update (`deltas`, stored as link t of its chain) with the tasks'
    projectors routed by CPM: its scores, the τ it used and its size."""
    assembly, tau = routed(ctx, deltas)
    return score(ctx, [assembly] * len(ctx.tasks)), {
        "tau": tau, **routed_footprint(ctx, stored(ctx.inputs.chain[-1])[1])}
