"""The `continual_update` flow (docs/design.md §2, §4): the whole stream as one recipe of cached stages.

The configured method rows (tasks.rows) say what they read; the flow submits the shared stages that some row
needs — all finetunes at once (they depend only on the base), so they run as parallel as the Ray cluster allows —
then each distinct chain once (the RLS merge, the batch merges, SeqLoRA, CRAM, Fwd-Prompt: each link follows as
its inputs complete), then one eval stage per (row, t). Each stage first looks its cache key up in the store, so a
rerun with nothing new computes nothing and never starts Ray; adding a task computes only that task's stages, its
chain links and row t of every method's matrix. A stage whose inputs are already known and which is cached (the
stages of the tasks a growing stream already had) is looked up as it is submitted and becomes no Prefect task.

A stage that fails with bad input (a ValueError: a task's data, an adapter that does not fit) fails the run at once:
the flow stops waiting, abandons the rest (tasks.dispatch.abandon: stages not started do not start, Ray tasks in
flight — the base pretraining — are cancelled) and raises that error. Other failures let independent stages finish
(their results are cached for the rerun) and raise the first root cause at the end.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow
from prefect.exceptions import UpstreamTaskError
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import RunConfig
from flows.graph import cached_record, new_run_id, store_spec, submit_stream, upload_adapters, write_summary
from flows.preflight import preflight
from flows.report import last_diagnostics, timeline_from_run
from flows.retention import leased
from tasks.dispatch import ClusterSpec, abandon, end_run, stage_task
from tasks.gate import stage_priority
from tasks.progress import Board
from tasks.record import StageRecord, print_stage_line
from tasks.runtime import node_name, ray_started, shutdown_ray
from tasks.store import StoreError

Upstream = dict[str, tuple[PrefectFuture, str]]


@flow(name="continual-update", task_runner=ThreadPoolTaskRunner(max_workers=64), persist_result=False, validate_parameters=False)
@leased  # a run lease on the store until the summary is written: a deleting gc waits (docs/design.md §3.4)
def continual_update(config: RunConfig, run_id: str | None = None, progress: bool = False, repair: bool = False) -> dict[str, Any]:
    """Run the configured stream through every configured method; return the run summary (docs/design.md §5).

    With `repair`, every cached stage's blobs are re-hashed and a stage with a missing or corrupt blob (or an
    unreadable manifest) is recomputed (`tasks.cache.run_stage(repair=True)`)."""
    preflight(config)
    run_id = run_id or new_run_id()
    store = store_spec(config)
    board = Board() if progress else None  # live progress of the stages that compute (tasks/progress.py)
    cluster = ClusterSpec(config.ray.address, config.ray.num_cpus, config.ray.object_store_mb, progress,
                          board.token if board else None, config.ray.critical_path_first)
    index = {t.name: i for i, t in enumerate(config.tasks)}
    submitted: list[PrefectFuture | StageRecord] = []
    opened, node = store.open(), node_name()

    def submit(stage: str, cfg: Any, upstream: Upstream, group: str, task: str | None = None,
               method: str | None = None) -> PrefectFuture | StageRecord:
        """One stage: its record at once when its inputs are known and it is cached (no Prefect task: the cached
        prefix of a stream that grew costs a manifest read per stage), else a Prefect task; `group` picks its Ray
        resources from config.resources."""
        if not repair and all(isinstance(handle, StageRecord) for handle, _ in upstream.values()):
            try:
                record = cached_record(opened, stage, cfg, upstream, task, method, node)
            except StoreError:  # an unreadable manifest, a store hiccup: the Prefect task retries or reports it
                record = None
            if record is not None:
                submitted.append(record)
                if progress:
                    print_stage_line(stage, task, method, "cached", f"{record.seconds:7.1f}s  {record.node}")
                if board:
                    board.finished((stage, task, method), "cached")
                return record
        resources = getattr(config.resources, group)
        label = stage + (f"[{task}]" if task else "") + (f"[{method}]" if method else "")
        future = stage_task.with_options(task_run_name=label, retries=config.retries, retry_delay_seconds=2).submit(
            stage, cfg, upstream, store=store, cluster=cluster, num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus, resource_group=group, task_name=task, method=method, repair=repair,
            run_id=run_id, priority=stage_priority(stage, index.get(task)),
        )
        submitted.append(future)
        return future

    stream = submit_stream(config, submit, upload_adapters(config, store))
    shared, chains = stream.shared, stream.chains
    evals = stream.evals
    if board:
        board.expect(len(submitted))
    futures = [f for f in submitted if not isinstance(f, StageRecord)]
    try:
        bad_input = _first_bad_input(futures)
        if bad_input is not None:
            cancelled = abandon(run_id)
            if progress:
                print(f"  stopping: a stage failed with bad input ({type(bad_input).__name__}); {cancelled} stage(s) "
                      "in flight cancelled", file=sys.stderr, flush=True)
            wait(futures)  # seconds: what has not started gives up, what ran is cancelled
            raise bad_input
        records = _results(submitted)
        started_ray = ray_started()
    finally:
        end_run(run_id)  # stage threads still running (the flow left by an exception) never start Ray again
        if board:
            board.close()
        shutdown_ray()
    diagnostics = last_diagnostics(chains)
    summary = write_summary(
        config, store, run_id, records, [(m, t, _result(f)) for m, t, f in evals], [_result(f) for f in shared.data],
        None if diagnostics is None else _result(diagnostics), started_ray,
    )
    report = summary["report"]
    _publish_artifacts(report, timeline_from_run(store.open(), summary))
    return summary


def _first_bad_input(futures: list[PrefectFuture]) -> BaseException | None:
    """Wait for the stages in the order they finish; return the first bad-input failure (a ValueError: never
    retried, the same on a rerun) as soon as it happens, or None once every stage has finished without one."""
    for future in as_completed(futures):
        try:
            future.result()  # done: returns or raises at once (`future.state` may still read Pending from the API)
        except UpstreamTaskError:
            continue
        except ValueError as error:
            return error
        except BaseException:  # noqa: BLE001 - a runtime failure: _results raises it once the rest has finished
            continue
    return None


def _result(handle: PrefectFuture | StageRecord) -> StageRecord:
    return handle if isinstance(handle, StageRecord) else handle.result()


def _results(futures: list[PrefectFuture | StageRecord]) -> list[StageRecord]:
    """Every stage's record; on failure, raise the first root cause (not the 'upstream failed' echoes)."""
    records, failures = [], []
    for future in futures:
        try:
            records.append(_result(future))
        except UpstreamTaskError:
            continue
        except BaseException as error:  # noqa: BLE001 - re-raised below, first root cause wins
            failures.append(error)
    if failures:
        raise failures[0]
    return records


def _publish_artifacts(report: dict[str, Any], timeline: list[Any]) -> None:
    """The summary table with its legend and accuracy matrices (markdown) and every report image (PNG as a data
    URL: the heatmap per method, the forgetting curves and the stage timeline, from many.report.render) as
    Prefect artifacts."""
    import base64
    import tempfile
    from pathlib import Path

    from prefect.artifacts import create_image_artifact, create_markdown_artifact

    from many.report import markdown_legend, markdown_table, matrix_markdown, render

    matrices = [f"**{m}** — A[t][j] after learning tasks ≤ t\n\n{matrix_markdown(report, m)}" for m in report["methods"]]
    create_markdown_artifact(markdown="\n".join([markdown_table(report), markdown_legend(report), *matrices]),
                             key="accuracy-matrix", description="MAny run report")
    with tempfile.TemporaryDirectory(prefix="many-report-") as scratch:
        for path in render(report, Path(scratch), timeline=timeline).values():
            if path.suffix == ".png":
                url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
                key = "report-" + "".join(c if c.isalnum() else "-" for c in path.stem.lower())
                create_image_artifact(image_url=url, key=key, description=f"MAny {path.stem}")
