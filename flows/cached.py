"""A rerun with nothing new, answered before Prefect, Ray or torch load (docs/design.md §4 "Cache first").

`many run` first walks the run's stage graph (flows.graph.submit_stream, the order the flow submits in) with a
`submit` that computes each stage's cache key from its upstream stages' output digests and reads its manifest at
once. If every stage is cached, that walk is the whole run: the summary and the report are written to the store as
the flow writes them (flows.graph.write_summary, under the same run lease) and the command prints what it always
prints — no Prefect server, no Ray, no torch, about a second of CPU. At the first stage that is not cached the walk
stops and the command runs the flow as usual (which looks the cached stages up again, in parallel on its threads).

Not taken for `--repair` (which re-hashes every blob) nor for a stream with a task that brings its own adapter (its
upload is the flow's). The Prefect artifacts of such a run are not republished: they are those of the run that
computed the stages.
"""

from __future__ import annotations

from typing import Any

from flows.config import RunConfig
from flows.graph import cached_record, new_run_id, submit_stream, write_summary
from flows.preflight import preflight
from flows.report import last_diagnostics
from tasks.record import StageRecord
from tasks.runtime import StoreSpec, node_name
from tasks.store import Store, StoreNotFound
from tasks.store.lease import run_lease


class _NotCached(Exception):
    """A stage of the graph has no manifest: the run has work to do."""


def cached_run(config: RunConfig) -> dict[str, Any] | None:
    """The run summary of `config` when every stage it needs is cached (written to the store, as the flow writes
    it), else None: nothing was written then but the run lease, taken and released. Bad input raises as in the flow
    (preflight first)."""
    if any(spec.adapter is not None for spec in config.tasks):
        return None
    preflight(config)
    s = config.store
    try:  # a store that does not exist yet holds nothing: the flow creates it
        opened = Store.open(s.url, endpoint_url=s.endpoint_url, region=s.region, profile=s.profile, create=False)
    except StoreNotFound:
        return None
    store = StoreSpec(opened.url, s.endpoint_url, s.region, s.profile)  # as flows.graph.store_spec names it
    node = node_name()
    records: list[StageRecord] = []

    def submit(stage: str, cfg: Any, upstream: dict[str, tuple[StageRecord, str]], group: str,
               task: str | None = None, method: str | None = None) -> StageRecord:
        record = cached_record(opened, stage, cfg, upstream, task, method, node)
        if record is None:
            raise _NotCached(stage)
        records.append(record)
        return record

    run_id = new_run_id()
    with run_lease(opened, run_id):
        try:
            stream = submit_stream(config, submit, {})
        except _NotCached:
            return None
        return write_summary(config, store, run_id, records, stream.evals, list(stream.shared.data),
                             last_diagnostics(stream.chains), started_ray=False)
