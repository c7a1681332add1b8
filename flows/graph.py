"""The stream as a graph of stages (docs/design.md §2, §10): which stages a run config asks for, with which
sub-configs and inputs, in the order they are submitted — the same for the Prefect flow (flows/pipeline.py), whose
`submit` returns Prefect futures, and for the cached-rerun check (flows/cached.py), whose `submit` looks each
stage up in the store at once. Nothing here imports Prefect, Ray or torch.

`submit(stage, sub_config, upstream, group, task, method)` returns a handle; `upstream` maps each input name to
(the handle of the stage that produces it, that stage's output name).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from flows.config import RunConfig
from flows.report import build_report
from flows.retention import config_fingerprint
from tasks.cache import lookup
from tasks.catalog import stage_def
from tasks.record import StageRecord
from tasks.rows import get_row
from tasks.rows.row import Chain, PerTask, Reuse, Row
from tasks.runtime import StoreSpec, node_name
from tasks.stages import (
    AdapterStageConfig,
    BaseStageConfig,
    DataStageConfig,
    FinetuneStageConfig,
    PrototypesStageConfig,
    StatsStageConfig,
)
from tasks.store import Store

Submit = Callable[..., Any]


@dataclass(frozen=True)
class Stream:
    """The handles of a submitted stream: the shared stages, each chain's links by stage name, and one eval per
    (row, t) as (method, t, handle)."""

    shared: PerTask
    chains: dict[str, list[Any]]
    evals: list[tuple[str, int, Any]]


def submit_stream(config: RunConfig, submit: Submit, uploads: dict[str, StageRecord]) -> Stream:
    """Submit every stage of the run: the shared stages some configured row needs, each distinct chain once (its
    followed chains first), then one eval per (row, t) — the order the flow has always submitted them in."""
    names = [t.name for t in config.tasks]
    rows = [get_row(method) for method in config.methods]
    shared = _shared_stages(config, submit, uploads, rows)
    chains: dict[str, list[Any]] = {}
    for row in rows:
        for chain in row.chains(config):  # its own chain and extras, each followed chain first
            if chain.stage not in chains:
                chains[chain.stage] = _chain_stages(config, submit, chain, shared, chains)
    evals = [
        (row.name, t, submit("eval", row.eval_config(config), row.eval_upstream(t, shared, chains), "eval", name, row.name))
        for row in rows for t, name in enumerate(names)
    ]
    return Stream(shared, chains, evals)


def cached_record(store: Store, stage: str, cfg: Any, upstream: dict[str, tuple[StageRecord, str]], task: str | None,
                  method: str | None, node: str) -> StageRecord | None:
    """The record of a stage whose upstream stages are all finished (`upstream` holds their records) if its manifest
    is in the store, else None: its key from their output digests, one manifest read, nothing computed."""
    started = time.monotonic()
    inputs = {name: record.outputs[output] for name, (record, output) in upstream.items()}
    manifest = lookup(store, stage_def(stage, inputs), cfg, inputs)
    if manifest is None:
        return None
    return StageRecord(stage, task, method, manifest.key, "cached", time.monotonic() - started, node, manifest.outputs)


def write_summary(
    config: RunConfig, store: StoreSpec, run_id: str, records: Sequence[StageRecord],
    evals: Sequence[tuple[str, int, StageRecord]], data: Sequence[StageRecord], diagnostics: StageRecord | None,
    started_ray: bool,
) -> dict[str, Any]:
    """The run summary (docs/design.md §5.2) of finished stages — `records` in submission order, each eval as
    (method, t, record), each task's data stage, the last merge diagnostics link or None — written to the store as
    runs/<run_id>.json and runs/latest.json, and returned."""
    report = build_report(store.open(), [t.name for t in config.tasks], config.methods, evals, data=data,
                          diagnostics=diagnostics)
    summary = {
        "run_id": run_id,
        "tasks": [t.name for t in config.tasks],
        "methods": list(config.methods),
        "config_fingerprint": config_fingerprint(config),  # which runs are one config to `gc --keep-last`
        "store": store.url,
        "ray_started": started_ray,
        "stages": [r.summary() for r in records],
        "report": report,
    }
    store.open().write_run(run_id, summary)
    store.open().write_run("latest", summary)
    return summary


def store_spec(config: RunConfig) -> StoreSpec:
    """The store as every worker reopens it: its canonical URL (a relative path made absolute here)."""
    s = config.store
    opened = StoreSpec(s.url, s.endpoint_url, s.region, s.profile).open()
    return StoreSpec(opened.url, s.endpoint_url, s.region, s.profile)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def data_config(config: RunConfig, index: int) -> DataStageConfig:
    spec = config.tasks[index]
    if spec.kind is not None:
        return DataStageConfig(name=spec.name, kind=spec.kind, mini_ucit=config.data.mini_ucit)
    return DataStageConfig(
        name=spec.name, train_json=spec.train_json, test_json=spec.test_json, image_root=spec.image_root, metric=spec.metric
    )


def base_config(config: RunConfig) -> BaseStageConfig:
    base = config.base.model_copy(update={"device": "auto"})  # the worker's resources pick the device
    if base.kind == "tiny":
        return BaseStageConfig(base=base, mini_ucit=config.data.mini_ucit, pretrain_samples=config.data.pretrain_samples)
    return BaseStageConfig(base=base)




def upload_adapters(config: RunConfig, store: StoreSpec) -> dict[str, StageRecord]:
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


def _shared_stages(config: RunConfig, submit: Submit, uploads: dict[str, StageRecord], rows: list[Row]) -> PerTask:
    """base and, per task, data plus the shared stages some row needs: finetune (all at once: they need only the
    base), prototypes, stats. A task with its own adapter (`uploads`) gets an adapter stage, which checks it against
    the base, instead of a finetune."""
    names, dtype = [t.name for t in config.tasks], config.base.dtype
    needs = frozenset().union(*(row.needs for row in rows))
    base = submit("base", base_config(config), {}, "base")
    data = [submit("data", data_config(config, t), {}, "data", name) for t, name in enumerate(names)]
    finetune = prototypes = stats = None
    if needs & {"finetune", "stats"}:
        finetune = [
            submit("adapter", AdapterStageConfig(), {"base": (base, "model"), "task": (uploads[name], "task")}, "finetune", name)
            if name in uploads else
            submit("finetune", FinetuneStageConfig(finetune=config.finetune, dtype=dtype),
                   {"base": (base, "model"), "data": (data[t], "task")}, "finetune", name)
            for t, name in enumerate(names)
        ]
    if "prototypes" in needs:
        prototypes = [
            submit("prototypes", PrototypesStageConfig(batch_size=config.eval.batch_size, dtype=dtype),
                   {"base": (base, "model"), "data": (data[t], "task")}, "prototypes", name)
            for t, name in enumerate(names)
        ]
    if "stats" in needs:
        stats = [
            submit("stats", StatsStageConfig(stats=config.stats, dtype=dtype),
                   {"base": (base, "model"), "data": (data[t], "task"), "finetune": (finetune[t], "task")}, "stats", name)
            for t, name in enumerate(names)
        ]
    return PerTask(base, data, finetune, prototypes, stats)


def _chain_stages(
    config: RunConfig, submit: Submit, chain: Chain, shared: PerTask, submitted: dict[str, list[Any]]
) -> list[Any]:
    """The links of one chain in task order; link t reads what the chain declares at t, its links < t and, if it
    follows a chain, that chain's links (`submitted`: the chains submitted so far)."""
    links: list[Any] = []
    for t, name in enumerate(t.name for t in config.tasks):
        upstream = chain.upstream(t, shared, links, submitted)
        if isinstance(upstream, Reuse):
            links.append(upstream.handle)
        else:
            links.append(submit(chain.stage, chain.config(config, name), upstream, chain.group, name, chain.method))
    return links


