"""The pipeline's stages (DESIGN.md §2): what each reads and writes, its compute (a thin call into `many`),
and the sub-configs that key their cache entries; tasks.dispatch runs any of them through the store's cache.

    data[t] ─┐
    base ────┼─► finetune[t] ─► stats[t] ─┐
             ├─► prototypes[t]            ├─► merge[t] = RLS(merge[t−1], finetune[t], stats[t])
             │                            │   merge_<baseline>[t] = batch merge of finetune[≤t] (+ stats)
             ├─► seqlora[t] = finetune from seqlora[t−1]
             ├─► cram[t] = expert t, its rank and penalty from the experts of cram[<t]
             └─► fwd_prompt[t] = prompts + core after task t, from fwd_prompt[t−1]
    eval[t][method]: base + the method's merged artifacts at t + test data[≤t] → predictions + row t of A

A stage's cache key is its sub-config plus the digests of its inputs (`tasks.stage.cache_key`). A compute reads
local copies of its inputs and writes its outputs under a work directory; it never sees the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import PositiveInt

from many.config import BaseConfig, CPMConfig, EvalConfig, FinetuneConfig, Frozen, LPMConfig, StatsConfig
from many.data import Metric, MiniUcitConfig
from many.methods.cram import CramConfig
from many.methods.fwd_prompt import FwdPromptConfig
from tasks.merge import merge_step
from tasks.stage import Stage

# Bump a stage's version when its code would produce different results: its cache keys change.
VERSIONS = {
    "data": "1",
    "base": "1",
    "finetune": "2",  # 2: the adapter files hold no local path (identical bytes on every machine)
    "seqlora": "2",
    "adapter": "1",
    "prototypes": "2",  # 2: f(x) = mean of the projector's input tokens, not the CLS pooler output
    "stats": "2",  # 2: Grams stored once per input group (q/k/v, gate/up share one), layer → group map in metadata
    "merge": "3",  # 3: one state file per input group (C once, no R), groups fanned out over Ray on the node
    "merge_average": "1",
    "merge_task_arithmetic": "1",
    "merge_ties": "1",
    "merge_regmean": "1",
    "eval": "2",  # 2: CPM routes with the patch-mean feature
    "cram": "1",
    "fwd_prompt": "1",
}
OUTPUTS = {
    "data": ("task",),
    "base": ("model",),
    "finetune": ("task",),
    "adapter": ("task",),
    "seqlora": ("task",),
    "prototypes": ("prototypes",),
    "stats": ("grams",),
    "merge": ("state", "adapter"),
    "eval": ("predictions", "scores"),
    "cram": ("expert",),
    "fwd_prompt": ("state",),
}
BASELINES = ("average", "task_arithmetic", "ties", "regmean")
for _name in BASELINES:
    OUTPUTS[f"merge_{_name}"] = ("deltas",)


# -- the sub-configs that go into the stages' cache keys ------------------------------------------------


class DataStageConfig(Frozen):
    """One task's data: a mini-UCIT kind (generated from `mini_ucit`) or LLaVA JSON + images."""

    name: str
    kind: str | None = None
    mini_ucit: MiniUcitConfig | None = None
    train_json: str | None = None
    test_json: str | None = None
    image_root: str | None = None
    metric: Metric = "exact_match"


class BaseStageConfig(Frozen):
    """The base model recipe; `device` is always "auto" here: the worker's resources decide it."""

    base: BaseConfig
    mini_ucit: MiniUcitConfig | None = None  # pretraining captions of the tiny base
    pretrain_samples: int = 0


class FinetuneStageConfig(Frozen):
    finetune: FinetuneConfig
    dtype: str = "float32"


class AdapterStageConfig(Frozen):
    """adapter[t] reads nothing but its inputs: the base and the user's task directory."""


class PrototypesStageConfig(Frozen):
    batch_size: PositiveInt = 64
    dtype: str = "float32"


class StatsStageConfig(Frozen):
    stats: StatsConfig
    dtype: str = "float32"


class CramStageConfig(Frozen):
    cram: CramConfig
    dtype: str = "float32"


class FwdPromptStageConfig(Frozen):
    fwd_prompt: FwdPromptConfig
    dtype: str = "float32"


EvalMethod = Literal[
    "many", "many_lpm_only", "many_cpm_only", "individual", "seqlora", "average", "task_arithmetic", "ties", "regmean",
    "cram", "fwd_prompt",
]


class EvalStageConfig(Frozen):
    """How row t of one method's accuracy matrix is produced; `cpm` only for the routed methods."""

    method: EvalMethod
    eval: EvalConfig
    cpm: CPMConfig | None = None
    dtype: str = "float32"


ROUTED = ("many", "many_cpm_only")
SYSTEMS = ("cram", "fwd_prompt")  # seed systems with stage chains of their own: they read no finetune[t]


def stage_def(name: str, inputs: Mapping[str, Any]) -> Stage:
    """The Stage of `name` reading exactly these named inputs (lists like finetune_0..t vary with t)."""
    if name not in VERSIONS:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(VERSIONS)}")
    return Stage(name, VERSIONS[name], tuple(sorted(inputs)), OUTPUTS[name])


# -- the computes: read local inputs, call many, write outputs under workdir -----------------------------------


def _load_base(path: Path, dtype: str, device: str):
    from many.model.load import load_base

    return load_base(path, BaseConfig(dtype=dtype, device=device))


def _indexed(inputs: Mapping[str, Path], prefix: str) -> list[Path]:
    """inputs prefix_0, prefix_1, … in index order."""
    found = {int(name.rsplit("_", 1)[1]): path for name, path in inputs.items() if name.rsplit("_", 1)[0] == prefix}
    return [found[i] for i in range(len(found))]


def compute_data(inputs: Mapping[str, Path], workdir: Path, *, config: DataStageConfig, device: str) -> dict[str, Path]:
    from many.data import TaskData, load_llava_json, make_task, write_task

    if config.kind is not None:
        task = make_task(config.kind, config.mini_ucit or MiniUcitConfig())
        task = replace(task, name=config.name)
    else:
        import fsspec

        def samples(json_path: str):
            fs, _ = fsspec.core.url_to_fs(json_path)
            return load_llava_json(json_path, config.image_root, fs=fs, name=config.name)

        task = TaskData(config.name, config.metric, samples(config.train_json), samples(config.test_json))
    write_task(task, workdir / "task")
    return {"task": workdir / "task"}


def compute_base(inputs: Mapping[str, Path], workdir: Path, *, config: BaseStageConfig, device: str) -> dict[str, Path]:
    from many.data import pretrain_samples, vocabulary
    from many.pretrain import make_base

    cfg = config.base.model_copy(update={"device": device})
    if cfg.kind == "tiny":
        samples = pretrain_samples(config.mini_ucit or MiniUcitConfig(), config.pretrain_samples)
        words = vocabulary()
    else:
        samples, words = (), ()
    make_base(cfg, words, samples, workdir / "model", progress=False)
    return {"model": workdir / "model"}


def compute_finetune(
    inputs: Mapping[str, Path], workdir: Path, *, config: FinetuneStageConfig, device: str
) -> dict[str, Path]:
    """finetune[t] from the base; seqlora[t] continues `previous` (the chain's task dir at t−1)."""
    from many.adapters import save_task
    from many.data import read_task
    from many.training import finetune

    model, processor = _load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    trained = finetune(model, processor, task.train, config.finetune, init_dir=inputs.get("previous"), progress=False)
    save_task(trained, workdir / "task")
    return {"task": workdir / "task"}


def compute_adapter(inputs: Mapping[str, Path], workdir: Path, *, config: AdapterStageConfig, device: str) -> dict[str, Path]:
    """adapter[t]: a task fine-tuned elsewhere (`tasks[i].adapter`) in place of finetune[t], checked against the
    base it will be merged into (flows/preflight.py checked it against the configured architecture already)."""
    import shutil

    from many.adapters import check_task_dir
    from many.model.shapes import base_shapes

    shapes = base_shapes(BaseConfig(kind="hf", hf_id=str(inputs["base"])))
    check_task_dir(inputs["task"], shapes.linears, shapes.projector)
    shutil.copytree(inputs["task"], workdir / "task")
    return {"task": workdir / "task"}


def compute_prototypes(
    inputs: Mapping[str, Path], workdir: Path, *, config: PrototypesStageConfig, device: str
) -> dict[str, Path]:
    from many.data import read_task
    from many.prototypes import image_features, prototype_table, write_prototypes

    model, processor = _load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    features = image_features(model, processor, task.train, config.batch_size)
    path = workdir / "prototypes.parquet"
    write_prototypes(prototype_table(task.name, task.train, features), path)
    return {"prototypes": path}


def compute_stats(inputs: Mapping[str, Path], workdir: Path, *, config: StatsStageConfig, device: str) -> dict[str, Path]:
    """Grams under the task's OWN fine-tuned model, over all tokens (DESIGN.md §8 lesson 2)."""
    from many.data import read_task
    from many.stats import collect_grams, save_grams
    from many.adapters import load_task

    model, processor = _load_base(inputs["base"], config.dtype, device)
    tuned = load_task(model, inputs["finetune"])
    task = read_task(inputs["data"])
    grams = collect_grams(tuned, processor, task.train, config.stats, progress=False)
    path = workdir / "gram.safetensors"
    save_grams(grams, path)
    return {"grams": path}


def compute_merge(inputs: Mapping[str, Path], workdir: Path, *, config: LPMConfig, device: str) -> dict[str, Path]:
    """merge[t]: fold task t into the RLS state of tasks < t and export the merge as a rank-Σr PEFT adapter.

    One job per input group (the LoRA layers sharing one Gram, hence one C): read its Gram and previous state file,
    absorb, export, write its new state file (C once, B and AG per layer; tasks/merge.py has the layout). In a Ray
    worker the jobs fan out as 1-CPU Ray tasks pinned to this node, where the inputs and the workdir are local
    files; outside Ray they run one after another, with the same bytes. Peak memory: concurrent jobs × one group.
    """
    return merge_step(inputs, workdir, config)


def compute_batch_merge(inputs: Mapping[str, Path], workdir: Path, *, config: Frozen, method: str, device: str) -> dict[str, Path]:
    """merge_<baseline>[t]: the batch merge of the adapters of tasks ≤ t (RegMean also reads their Grams)."""
    from safetensors.torch import save_file

    from many.adapters import lora_factors
    from many.evaluate import lora_deltas
    from many.merging import merge_model
    from many.stats import load_grams

    per_task = [lora_deltas(lora_factors(path / "adapter")) for path in _indexed(inputs, "finetune")]
    deltas = {module: [task[module] for task in per_task] for module in per_task[0]}
    grams = None
    if method == "regmean":
        per_task_grams = [load_grams(path) for path in _indexed(inputs, "stats")]
        grams = {module: [g[module] for g in per_task_grams] for module in deltas}
    merged = merge_model(method, deltas, grams, config)
    path = workdir / "deltas.safetensors"
    save_file({k: v.to("cpu").float().contiguous() for k, v in merged.items()}, str(path))
    return {"deltas": path}


def _average_projector(task_dirs: list[Path]) -> dict[str, Any]:
    from many.adapters import projector_state

    states = [projector_state(d) for d in task_dirs]
    return {k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}


def compute_cram(inputs: Mapping[str, Path], workdir: Path, *, config: CramStageConfig, device: str) -> dict[str, Path]:
    """cram[t]: task t's isolated expert from the base; its rank and orthogonality penalty read the experts of
    tasks < t (inputs expert_0 … expert_{t−1}), which stay untouched."""
    from many.data import read_task
    from many.methods.cram import save_expert, train_expert

    model, processor = _load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    expert, allocation = train_expert(model, processor, task.train, config.cram, _indexed(inputs, "expert"), progress=False)
    save_expert(expert, allocation, workdir / "expert")
    return {"expert": workdir / "expert"}


def compute_fwd_prompt(inputs: Mapping[str, Path], workdir: Path, *, config: FwdPromptStageConfig, device: str) -> dict[str, Path]:
    """fwd_prompt[t]: the prompts and core after task t, continuing `previous` (fwd_prompt[t−1]); no samples kept."""
    from many.data import read_task
    from many.methods.fwd_prompt import load_state, save_state, train_task

    model, processor = _load_base(inputs["base"], config.dtype, device)
    task = read_task(inputs["data"])
    previous = load_state(inputs["previous"]) if "previous" in inputs else None
    state = train_task(model, processor, task.train, previous, config.fwd_prompt, progress=False)
    save_state(state, workdir / "state")
    return {"state": workdir / "state"}


EvalFields = dict[str, Any]  # method-specific fields of the scores JSON, next to method/tasks/scores/tau


def _eval_cram(inputs: Mapping[str, Path], base_model: Any, processor: Any, tasks: list[Any], cfg: EvalConfig) -> tuple[list[Any], EvalFields]:
    """CRAM at t: each test image answered by the expert of its nearest task centroid — the CPM prototypes[≤t]."""
    from many.methods.cram import evaluate_cram, load_expert, trainable_parameters
    from many.prototypes import read_prototypes

    experts = [load_expert(path) for path in _indexed(inputs, "expert")]
    _, centroids, _ = read_prototypes(_indexed(inputs, "prototypes"))
    results = evaluate_cram(base_model, processor, tasks, experts, centroids, cfg)
    per_task = [trainable_parameters(expert)["total"] for expert in experts]
    return results, {"trainable_parameters": sum(per_task), "parameters_per_task": per_task,
                     "ranks": [expert.allocation.rank for expert in experts]}


def _eval_fwd_prompt(inputs: Mapping[str, Path], base_model: Any, processor: Any, tasks: list[Any], cfg: EvalConfig) -> tuple[list[Any], EvalFields]:
    """Fwd-Prompt at t: the base with the prompts of fwd_prompt[t] in front of every test prompt."""
    from many.evaluate import evaluate
    from many.methods.fwd_prompt import load_state, prompted_model, prompted_samples

    state = load_state(inputs["merged"])
    model, prompted = prompted_model(base_model, processor, state)
    n = state.prompts.shape[0]
    results = [evaluate(model, prompted, replace(task, test=prompted_samples(task.test, n)), cfg) for task in tasks]
    # the prompts (n, d) are the only trained tensor; the core basis is computed, not trained
    return results, {"trainable_parameters": state.prompts.numel(), "core_dims": state.core.shape[1]}


SYSTEM_EVALS = {"cram": _eval_cram, "fwd_prompt": _eval_fwd_prompt}


def _write_eval(workdir: Path, method: str, results: list[Any], fields: EvalFields) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from many.evaluate import predictions_table

    predictions = workdir / "predictions.parquet"
    pq.write_table(pa.concat_tables([predictions_table(r) for r in results]), predictions)
    scores = workdir / "scores.json"
    scores.write_text(json.dumps({
        "method": method, "tasks": [r.task for r in results], "scores": [r.score for r in results], **fields,
    }, sort_keys=True))
    return {"predictions": predictions, "scores": scores}


def compute_eval(inputs: Mapping[str, Path], workdir: Path, *, config: EvalStageConfig, device: str) -> dict[str, Path]:
    """Row t of the method's accuracy matrix: its model at t scored on the test split of every task ≤ t.

    scores.json: {"method", "tasks", "scores" (percent), "tau"} and, for CRAM and Fwd-Prompt, the parameters they
    trained: "trainable_parameters" (held after task t) and CRAM's "parameters_per_task" and "ranks" per expert.
    """
    from safetensors.torch import load_file

    from many.adapters import lora_factors, projector_state
    from many.data import read_task
    from many.evaluate import Assembly, assemble, cpm_router, evaluate, lora_deltas

    base_model, processor = _load_base(inputs["base"], config.dtype, device)
    tasks = [read_task(path) for path in _indexed(inputs, "data")]
    task_dirs = _indexed(inputs, "finetune")
    method = config.method
    tau = None
    if method in SYSTEM_EVALS:  # trained their own way (no finetune inputs), so evaluated their own way
        results, fields = SYSTEM_EVALS[method](inputs, base_model, processor, tasks, config.eval)
        return _write_eval(workdir, method, results, {"tau": None, **fields})

    def routed(deltas: Mapping[str, Any]) -> Assembly:
        nonlocal tau
        router = cpm_router(_indexed(inputs, "prototypes"), config.cpm or CPMConfig())
        tau = router.tau
        projectors = tuple(projector_state(d) for d in task_dirs)
        return Assembly(deltas, projectors, "cpm", router.prototypes, router.tau, router.top_k)

    if method == "individual":
        assemblies = [
            Assembly(lora_deltas(lora_factors(d / "adapter")), (projector_state(d),)) for d in task_dirs
        ]
    else:
        if method in ("many", "many_lpm_only"):
            deltas = lora_deltas(lora_factors(inputs["merged"]))
        elif method == "seqlora":
            deltas = lora_deltas(lora_factors(inputs["merged"] / "adapter"))
        else:  # batch merges and many_cpm_only (averaged LoRA)
            deltas = load_file(str(inputs["merged"]))
        if method in ROUTED:
            assembly = routed(deltas)
        elif method == "seqlora":
            assembly = Assembly(deltas, (projector_state(inputs["merged"]),))
        else:
            assembly = Assembly(deltas, (_average_projector(task_dirs),))
        assemblies = [assembly] * len(tasks)

    results, model, built = [], None, None
    for task_data, assembly in zip(tasks, assemblies, strict=True):
        if assembly is not built:
            model, built = assemble(base_model, assembly), assembly
        results.append(evaluate(model, processor, task_data, config.eval, routing=assembly.router))
    return _write_eval(workdir, method, results, {"tau": tau})


def compute_of(name: str) -> Callable[..., dict[str, Path]]:
    """The compute function of stage `name`: (local inputs, workdir, *, config, device) → {output: local path}."""
    if name.startswith("merge_"):
        method = name.removeprefix("merge_")
        return lambda inputs, workdir, *, config, device: compute_batch_merge(
            inputs, workdir, config=config, method=method, device=device
        )
    return {
        "data": compute_data,
        "base": compute_base,
        "finetune": compute_finetune,
        "seqlora": compute_finetune,
        "adapter": compute_adapter,
        "prototypes": compute_prototypes,
        "stats": compute_stats,
        "merge": compute_merge,
        "eval": compute_eval,
        "cram": compute_cram,
        "fwd_prompt": compute_fwd_prompt,
    }[name]


__all__ = [
    "AdapterStageConfig", "BASELINES", "BaseStageConfig", "CramStageConfig", "DataStageConfig", "EvalStageConfig",
    "FinetuneStageConfig", "FwdPromptStageConfig", "PrototypesStageConfig", "ROUTED", "SYSTEMS", "StatsStageConfig",
    "compute_of", "stage_def",
]
