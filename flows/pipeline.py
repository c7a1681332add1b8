"""The `continual_update` flow (DESIGN.md §2, §4): the whole stream as one recipe of cached stages.

All finetunes depend only on the base, so they are submitted at once and run as parallel as the Ray
cluster allows; the RLS merge is a chain that follows as its inputs complete, as do the SeqLoRA, CRAM and
Fwd-Prompt chains (each link trains from the previous ones); every method's evaluation of row t is a stage
of its own. Each stage first looks its cache key up in the store, so a rerun with
nothing new computes nothing and never starts Ray; adding a task computes only that task's stages, its
merges and row t of every method's matrix.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from prefect import flow
from prefect.exceptions import UpstreamTaskError
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import RunConfig
from flows.preflight import preflight
from flows.report import build_report
from tasks.dispatch import ClusterSpec, StageRecord, stage_task
from tasks.runtime import StoreSpec, node_name, ray_started, shutdown_ray
from tasks.stages import (
    BASELINES,
    ROUTED,
    SYSTEMS,
    AdapterStageConfig,
    BaseStageConfig,
    CramStageConfig,
    DataStageConfig,
    EvalStageConfig,
    FinetuneStageConfig,
    FwdPromptStageConfig,
    PrototypesStageConfig,
    StatsStageConfig,
)

Upstream = dict[str, tuple[PrefectFuture, str]]


def store_spec(config: RunConfig) -> StoreSpec:
    """The store as every worker reopens it: its canonical URL (a relative path made absolute here)."""
    s = config.store
    opened = StoreSpec(s.url, s.endpoint_url, s.region, s.profile).open()
    return StoreSpec(opened.url, s.endpoint_url, s.region, s.profile)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _data_config(config: RunConfig, index: int) -> DataStageConfig:
    spec = config.tasks[index]
    if spec.kind is not None:
        return DataStageConfig(name=spec.name, kind=spec.kind, mini_ucit=config.data.mini_ucit)
    return DataStageConfig(
        name=spec.name, train_json=spec.train_json, test_json=spec.test_json, image_root=spec.image_root, metric=spec.metric
    )


def _base_config(config: RunConfig) -> BaseStageConfig:
    base = config.base.model_copy(update={"device": "auto"})  # the worker's resources pick the device
    if base.kind == "tiny":
        return BaseStageConfig(base=base, mini_ucit=config.data.mini_ucit, pretrain_samples=config.data.pretrain_samples)
    return BaseStageConfig(base=base)


def _indexed(name: str, futures: list[PrefectFuture], output: str) -> Upstream:
    return {f"{name}_{j}": (future, output) for j, future in enumerate(futures)}


Submit = Callable[..., PrefectFuture]


@flow(name="continual-update", task_runner=ThreadPoolTaskRunner(max_workers=64), persist_result=False, validate_parameters=False)
def continual_update(config: RunConfig, run_id: str | None = None, progress: bool = False, repair: bool = False) -> dict[str, Any]:
    """Run the configured stream through every configured method; return the run summary (DESIGN.md §5).

    With `repair`, every cached stage's blobs are re-hashed and a stage with a missing or corrupt blob (or an
    unreadable manifest) is recomputed (`tasks.stage.run_stage(repair=True)`)."""
    preflight(config)
    run_id = run_id or new_run_id()
    store = store_spec(config)
    cluster = ClusterSpec(config.ray.address, config.ray.num_cpus, config.ray.object_store_mb, progress)
    names = [t.name for t in config.tasks]
    submitted: list[PrefectFuture] = []

    def submit(stage: str, cfg: Any, upstream: Upstream, group: str, task: str | None = None, method: str | None = None) -> PrefectFuture:
        """One stage as a Prefect task; `group` picks its Ray resources from config.resources."""
        resources = getattr(config.resources, group)
        label = stage + (f"[{task}]" if task else "") + (f"[{method}]" if method else "")
        future = stage_task.with_options(task_run_name=label, retries=config.retries, retry_delay_seconds=2).submit(
            stage, cfg, upstream, store=store, cluster=cluster, num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus, resource_group=group, task_name=task, method=method, repair=repair,
        )
        submitted.append(future)
        return future

    per_task = _task_stages(config, submit, _upload_adapters(config, store))
    merged = _merge_stages(config, submit, per_task)
    systems = _system_stages(config, submit, per_task)
    evals = _eval_stages(config, submit, per_task, merged, systems)
    try:
        wait(submitted)
        records = _results(submitted)
        started_ray = ray_started()
    finally:
        shutdown_ray()
    report = build_report(store.open(), names, config.methods, [(m, t, f.result()) for m, t, f in evals])
    summary = {
        "run_id": run_id,
        "tasks": names,
        "methods": list(config.methods),
        "store": store.url,
        "ray_started": started_ray,
        "stages": [r.summary() for r in records],
        "report": report,
    }
    store.open().write_run(run_id, summary)
    store.open().write_run("latest", summary)
    _publish_artifacts(report)
    return summary


def _upload_adapters(config: RunConfig, store: StoreSpec) -> dict[str, StageRecord]:
    """The user's own task adapters (`tasks[i].adapter`, checked by preflight), put into the store: as the
    output "task" of a pseudo-record, the upstream of that task's adapter stage."""
    import tempfile
    from pathlib import Path

    from many.adapters import copy_task_dir

    uploads = {}
    for spec in config.tasks:
        if spec.adapter is not None:
            with tempfile.TemporaryDirectory(prefix="many-adapter-") as scratch:
                ref = store.open().put(copy_task_dir(Path(spec.adapter), Path(scratch) / "task"))
            uploads[spec.name] = StageRecord("upload", spec.name, None, ref.digest, "cached", 0.0, node_name(), {"task": ref})
    return uploads


def _task_stages(config: RunConfig, submit: Submit, uploads: dict[str, StageRecord]) -> dict[str, Any]:
    """base, and per task: data, finetune (all at once: they need only the base), prototypes, stats.

    A task with its own adapter (`uploads`) gets an adapter stage, which checks it against the base, instead
    of a finetune.

    Only the stages some configured method reads: CRAM and Fwd-Prompt alone need no finetune[t]; the
    prototypes serve CPM routing and CRAM's centroids."""
    names, dtype, methods = [t.name for t in config.tasks], config.base.dtype, set(config.methods)
    base = submit("base", _base_config(config), {}, "base")
    data = [submit("data", _data_config(config, t), {}, "data", name) for t, name in enumerate(names)]
    finetune = prototypes = stats = None
    if methods - set(SYSTEMS):
        finetune = [
            submit("adapter", AdapterStageConfig(), {"base": (base, "model"), "task": (uploads[name], "task")}, "finetune", name)
            if name in uploads else
            submit("finetune", FinetuneStageConfig(finetune=config.finetune, dtype=dtype),
                   {"base": (base, "model"), "data": (data[t], "task")}, "finetune", name)
            for t, name in enumerate(names)
        ]
    if methods & {*ROUTED, "cram"}:
        prototypes = [
            submit("prototypes", PrototypesStageConfig(batch_size=config.eval.batch_size, dtype=dtype),
                   {"base": (base, "model"), "data": (data[t], "task")}, "prototypes", name)
            for t, name in enumerate(names)
        ]
    if methods & {"many", "many_lpm_only", "regmean"}:
        stats = [
            submit("stats", StatsStageConfig(stats=config.stats, dtype=dtype),
                   {"base": (base, "model"), "data": (data[t], "task"), "finetune": (finetune[t], "task")}, "stats", name)
            for t, name in enumerate(names)
        ]
    return {"base": base, "data": data, "finetune": finetune, "prototypes": prototypes, "stats": stats}


def _merge_stages(config: RunConfig, submit: Submit, per_task: dict[str, Any]) -> dict[str, list[tuple[PrefectFuture, str]]]:
    """Per method, the artifact its eval at t reads: the RLS chain, the batch merges, the SeqLoRA chain."""
    names, methods = [t.name for t in config.tasks], set(config.methods)
    finetune, stats = per_task["finetune"], per_task["stats"]
    merged: dict[str, list[tuple[PrefectFuture, str]]] = {}
    if methods & {"many", "many_lpm_only"}:
        chain: list[PrefectFuture] = []
        for t, name in enumerate(names):
            upstream: Upstream = {"finetune": (finetune[t], "task"), "grams": (stats[t], "grams")}
            if t:
                upstream["previous"] = (chain[t - 1], "state")
            chain.append(submit("merge", config.lpm, upstream, "merge", name, "many"))
        merged["many"] = merged["many_lpm_only"] = [(m, "adapter") for m in chain]
    for method in BASELINES:
        if method not in methods and not (method == "average" and "many_cpm_only" in methods):
            continue
        batch = []
        for t, name in enumerate(names):
            upstream = _indexed("finetune", finetune[: t + 1], "task")
            if method == "regmean":
                upstream |= _indexed("stats", stats[: t + 1], "grams")
            batch.append(submit(f"merge_{method}", getattr(config.merging, method), upstream, "merge", name, method))
        merged[method] = [(m, "deltas") for m in batch]
    if "many_cpm_only" in methods:
        merged["many_cpm_only"] = merged["average"]
    if "seqlora" in methods:
        chain = [finetune[0]]  # the chain's first link is exactly finetune[0]
        for t in range(1, len(names)):
            chain.append(submit(
                "seqlora", FinetuneStageConfig(finetune=config.finetune, dtype=config.base.dtype),
                {"base": (per_task["base"], "model"), "data": (per_task["data"][t], "task"), "previous": (chain[t - 1], "task")},
                "finetune", names[t], "seqlora",
            ))
        merged["seqlora"] = [(m, "task") for m in chain]
    return merged


def _system_stages(config: RunConfig, submit: Submit, per_task: dict[str, Any]) -> dict[str, list[PrefectFuture]]:
    """The seed systems' chains (DESIGN.md §1): cram[t] reads the experts of cram[<t] (its rank and penalty
    depend on them), fwd_prompt[t] continues the prompts and core of fwd_prompt[t−1]."""
    names, dtype, methods = [t.name for t in config.tasks], config.base.dtype, set(config.methods)
    base, data = per_task["base"], per_task["data"]
    chains: dict[str, list[PrefectFuture]] = {}
    if "cram" in methods:
        experts: list[PrefectFuture] = []
        for t, name in enumerate(names):
            upstream = {"base": (base, "model"), "data": (data[t], "task")} | _indexed("expert", experts, "expert")
            experts.append(submit("cram", CramStageConfig(cram=config.cram, dtype=dtype), upstream, "finetune", name, "cram"))
        chains["cram"] = experts
    if "fwd_prompt" in methods:
        states: list[PrefectFuture] = []
        for t, name in enumerate(names):
            upstream = {"base": (base, "model"), "data": (data[t], "task")}
            if t:
                upstream["previous"] = (states[t - 1], "state")
            states.append(submit("fwd_prompt", FwdPromptStageConfig(fwd_prompt=config.fwd_prompt, dtype=dtype), upstream,
                                 "finetune", name, "fwd_prompt"))
        chains["fwd_prompt"] = states
    return chains


def _eval_stages(
    config: RunConfig, submit: Submit, per_task: dict[str, Any], merged: dict[str, list[tuple[PrefectFuture, str]]],
    systems: dict[str, list[PrefectFuture]],
) -> list[tuple[str, int, PrefectFuture]]:
    """eval[t][method]: the method's model after task t on the test split of every task ≤ t (row t of A)."""
    evals = []
    for method in config.methods:
        for t, name in enumerate(spec.name for spec in config.tasks):
            upstream = {"base": (per_task["base"], "model")} | _indexed("data", per_task["data"][: t + 1], "task")
            if method not in ("seqlora", *SYSTEMS):
                upstream |= _indexed("finetune", per_task["finetune"][: t + 1], "task")
            if method in ROUTED or method == "cram":
                upstream |= _indexed("prototypes", per_task["prototypes"][: t + 1], "prototypes")
            if method == "cram":
                upstream |= _indexed("expert", systems["cram"][: t + 1], "expert")
            elif method == "fwd_prompt":
                upstream["merged"] = (systems["fwd_prompt"][t], "state")
            elif method != "individual":
                upstream["merged"] = merged[method][t]
            cfg = EvalStageConfig(method=method, eval=config.eval, cpm=config.cpm if method in ROUTED else None,
                                  dtype=config.base.dtype)
            evals.append((method, t, submit("eval", cfg, upstream, "eval", name, method)))
    return evals


def _results(futures: list[PrefectFuture]) -> list[StageRecord]:
    """Every stage's record; on failure, raise the first root cause (not the 'upstream failed' echoes)."""
    records, failures = [], []
    for future in futures:
        try:
            records.append(future.result())
        except UpstreamTaskError:
            continue
        except BaseException as error:  # noqa: BLE001 - re-raised below, first root cause wins
            failures.append(error)
    if failures:
        raise failures[0]
    return records


def _publish_artifacts(report: dict[str, Any]) -> None:
    """The summary table and accuracy matrices (markdown) and every report image (PNG as a data URL: the
    heatmap per method and the forgetting curves, from many.report.render) as Prefect artifacts."""
    import base64
    import tempfile
    from pathlib import Path

    from prefect.artifacts import create_image_artifact, create_markdown_artifact

    from many.report import markdown_table, matrix_markdown, render

    matrices = [f"**{m}** — A[t][j] after learning tasks ≤ t\n\n{matrix_markdown(report, m)}" for m in report["methods"]]
    create_markdown_artifact(markdown="\n".join([markdown_table(report), *matrices]), key="accuracy-matrix",
                             description="MAny run report")
    with tempfile.TemporaryDirectory(prefix="many-report-") as scratch:
        for path in render(report, Path(scratch)).values():
            if path.suffix == ".png":
                url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
                key = "report-" + "".join(c if c.isalnum() else "-" for c in path.stem.lower())
                create_image_artifact(image_url=url, key=key, description=f"MAny {path.stem}")
