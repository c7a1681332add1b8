"""How one stage runs (docs/design.md §2, §4): a Prefect task looks the stage's cache key up in the store and, only on a
miss, starts Ray (lazily, once per process) and runs the stage's compute (tasks.catalog.compute_of) through
tasks.cache.run_stage as a Ray remote function with the resources the flow chose. Only small values cross
processes: sub-configs and blob references in, `StageRecord`s of blob references out; workers read and write the
store themselves.

A run can be abandoned (`abandon(run_id)`, flows.pipeline does when a stage fails with bad input): its stages that
have not started raise `StageAbandoned`, and its Ray tasks in flight are cancelled (`ray.cancel(force=True)`), so a
bad task fails the run in seconds instead of after the base has pretrained. Every flow ends its run (`end_run`)
before it shuts Ray down: a flow left by an exception (SIGTERM or Ctrl-C in a benchmark's process, a failed stage)
still has stage threads running, and none of them may start Ray again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.cache import intact, lookup, run_stage
from tasks.catalog import compute_of, recomputable_outputs, stage_def
from tasks.gate import Priority, PriorityGate
from tasks.progress import Channel, board_of, worker_channel
from tasks.record import StageRecord, print_stage_line, read_json_output
from tasks.restore import restore_inputs
from tasks.runtime import ClusterError, StoreSpec, check_resources, ensure_ray, node_name, ray_get
from tasks.store import BlobRef, CorruptArtifact, Manifest, StoreError


def execute(
    spec: StoreSpec, name: str, config: BaseModel, inputs: Mapping[str, BlobRef], num_cpus: float, device: str, repair: bool = False,
    progress: Channel | None = None,
) -> tuple[str, str, float, str, int]:
    """Body of the Ray remote function: run the stage through the cache on this worker.

    Small values go in (the sub-config, blob references) and plain ones come back: (status, manifest JSON,
    seconds, node, S3 retries). Tensors never cross processes; workers read and write the store themselves.
    With `progress` (the run's progress hub and this stage run's id) the compute reports to it (tasks/progress.py).
    """
    import torch

    from tasks.store.backend import retries_seen

    torch.set_num_threads(max(1, int(num_cpus)))
    started, retries_before = time.monotonic(), retries_seen()
    store = spec.open()
    compute = compute_of(name)
    node = node_name()
    with worker_channel(progress):
        result = run_stage(
            store, stage_def(name, inputs), config, inputs,
            lambda local, workdir: compute(local, workdir, config=config, device=device), host=node, repair=repair,
        )
    return result.status, result.manifest.model_dump_json(), time.monotonic() - started, node, retries_seen() - retries_before


_remote_execute = None


class StageAbandoned(RuntimeError):
    """The run gave up on this stage before it finished: another stage failed with bad input, or the run is over
    (never retried)."""


BAD_INPUT = "another stage failed with bad input"
RUN_OVER = "the run is over"

_runs_lock = threading.Lock()
_abandoned: dict[str, str] = {}  # run id → why; kept for the process's life (one short string per run)
_in_flight: dict[str, set[Any]] = {}  # run id → Ray ObjectRefs of its stages computing now


def abandon(run_id: str) -> int:
    """Give up on run `run_id` (a stage failed with bad input): stages not started yet raise StageAbandoned, Ray tasks
    in flight are cancelled (force: their workers are killed; a killed stage writes no manifest, its blobs are orphans
    for `gc`). Returns how many were cancelled."""
    with _runs_lock:
        _abandoned.setdefault(run_id, BAD_INPUT)
        refs = _in_flight.pop(run_id, set())
        running = _not_ready(list(refs))
        for ref in running:
            _cancel(ref)
        return len(running)


def _not_ready(refs: list[Any]) -> list[Any]:
    """The refs whose task has not finished: a cancel racing a task's completion can abort the driver in Ray 2.60
    (ray-project/ray#54798), so a finished task is never cancelled (what finishes in the microseconds between this
    check and the cancel is the race left)."""
    if not refs:
        return []
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return [ref for ref in refs if ref not in ready]


def end_run(run_id: str) -> None:
    """Run `run_id`'s flow is over (call before shutting Ray down): a stage of it that has not started raises
    StageAbandoned instead of starting Ray again. Its Ray tasks still in flight end with Ray's shutdown; they are not
    cancelled here (a cancel racing the shutdown can abort the driver)."""
    with _runs_lock:
        _abandoned.setdefault(run_id, RUN_OVER)
        _in_flight.pop(run_id, None)


def _check_abandoned(run_id: str | None, stage: str) -> None:
    if run_id is not None and run_id in _abandoned:
        raise StageAbandoned(f"stage {stage} of run {run_id} abandoned: {_abandoned[run_id]}")


def _cancel(ref: Any) -> None:
    import ray

    try:
        ray.cancel(ref, force=True)  # recursive: the merge stage's fanned-out jobs too
    except Exception:  # noqa: BLE001 - already finished or its worker gone: nothing left to stop
        pass


def _track(run_id: str | None, ref: Any) -> None:
    """Note a Ray task of run `run_id` in flight; cancel it at once if the run was abandoned meanwhile."""
    if run_id is None:
        return
    with _runs_lock:
        if run_id in _abandoned:
            _cancel(ref)
        else:
            _in_flight.setdefault(run_id, set()).add(ref)


def _untrack(run_id: str | None, ref: Any) -> None:
    if run_id is not None:
        with _runs_lock:
            _in_flight.get(run_id, set()).discard(ref)


@dataclass(frozen=True)
class ClusterSpec:
    """Where the flow wants computes to run, and how loud to be."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_mb: int = 200
    progress: bool = False
    board: str | None = None  # the run's live progress board (tasks.progress.Board.token); None: no live progress
    critical_path_first: bool = True  # a local cluster admits stages by priority (tasks/gate.py)


_gates: dict[int, PriorityGate] = {}  # local cluster size → its gate (one per process)
_gates_lock = threading.Lock()


def _local_gate(cluster: ClusterSpec) -> PriorityGate | None:
    """The priority gate of the local cluster this process starts (tasks/gate.py); None when joining a cluster
    (its size changes, other drivers share it) or when the run turned the gate off."""
    if cluster.address or not cluster.critical_path_first:
        return None
    cpus = cluster.num_cpus or os.cpu_count() or 1  # the size tasks.runtime.ensure_ray gives a local cluster
    with _gates_lock:
        return _gates.setdefault(cpus, PriorityGate(cpus))


def _resolve(upstream: Mapping[str, tuple[Any, str]]) -> dict[str, BlobRef]:
    refs = {}
    for name, (record, output) in upstream.items():
        if not isinstance(record, StageRecord) or output not in record.outputs:
            raise StoreError(f"input {name!r}: upstream stage gave no output {output!r} ({record!r})")
        refs[name] = record.outputs[output]
    return refs


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry store/network hiccups and lost Ray workers, never bad input."""
    try:
        state.result()
    except (ValueError, ClusterError, CorruptArtifact, StageAbandoned, KeyboardInterrupt):
        return False
    except (StoreError, OSError, ConnectionError):
        return True
    except Exception as error:  # Ray's worker/node losses
        return type(error).__name__ in {"WorkerCrashedError", "NodeDiedError", "ObjectLostError", "RaySystemError"}
    return False


@task(name="stage", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_transient)
def stage_task(
    stage: str,
    config: BaseModel,
    upstream: Mapping[str, tuple[Any, str]],
    *,
    store: StoreSpec,
    cluster: ClusterSpec,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    resource_group: str | None = None,
    task_name: str | None = None,
    method: str | None = None,
    repair: bool = False,
    run_id: str | None = None,
    priority: Priority | None = None,
) -> StageRecord:
    """Return the stage's cached manifest, or compute it on Ray with the given resources.

    `upstream` maps input name → (upstream StageRecord, its output name); Prefect resolves futures in it.
    With `repair`, a cached stage counts only if its manifest reads and its output blobs re-hash intact.
    `run_id` names the run for `abandon`; `priority` (tasks.gate.stage_priority) orders the stages waiting for a
    local cluster's cores.
    """
    _check_abandoned(run_id, stage)
    started = time.monotonic()
    inputs = _resolve(upstream)
    definition = stage_def(stage, inputs)
    try:
        cached = lookup(store.open(), definition, config, inputs)
    except CorruptArtifact:
        if not repair:
            raise
        cached = None  # run_stage(repair=True) replaces the unreadable manifest
    collectable = recomputable_outputs()
    if cached is not None and repair and not intact(store.open(), cached, collectable.get(stage, ())):
        cached = None
    if cached is not None:
        record = StageRecord(stage, task_name, method, cached.key, "cached", time.monotonic() - started, node_name(), cached.outputs)
    else:
        def recompute(producer: Manifest) -> Manifest:  # an earlier link whose output gc collected, as it was
            again = _compute_on_ray(
                producer.stage, type(config).from_keyed(producer.config), dict(producer.inputs), store, cluster,
                num_cpus, num_gpus, resource_group or stage, task_name, method, True, run_id, priority,
            )
            return store.open().read_manifest(producer.stage, again.key)

        restore_inputs(store.open(), stage, inputs, recompute, collectable)
        record = _compute_on_ray(
            stage, config, inputs, store, cluster, num_cpus, num_gpus, resource_group or stage, task_name, method,
            repair, run_id, priority,
        )
    if cluster.progress:
        retried = f"  ({record.s3_retries} S3 retries)" if record.s3_retries else ""
        print_stage_line(stage, task_name, method, record.status, f"{record.seconds:7.1f}s  {record.node}{retried}")
    if board := board_of(cluster.board):
        board.finished((stage, task_name, method), record.status)
    return record


def _compute_on_ray(
    stage: str, config: BaseModel, inputs: dict[str, BlobRef], store: StoreSpec, cluster: ClusterSpec,
    num_cpus: float, num_gpus: float, group: str, task_name: str | None, method: str | None, repair: bool = False,
    run_id: str | None = None, priority: Priority | None = None,
) -> StageRecord:
    global _remote_execute
    import ray

    with _runs_lock:  # an ending run (end_run, then Ray's shutdown) waits for a start in progress; a later one sees it
        _check_abandoned(run_id, stage)
        ensure_ray(cluster.address, cluster.num_cpus, cluster.object_store_mb)
    check_resources(group, num_cpus, num_gpus)
    if _remote_execute is None:
        _remote_execute = ray.remote(execute)
    gate = _local_gate(cluster) if priority is not None and num_gpus == 0 else None
    if gate is None:
        return _run_on_ray(stage, config, inputs, store, cluster, num_cpus, num_gpus, task_name, method, repair, run_id)
    with gate.slot(num_cpus, priority, give_up=lambda: run_id is not None and run_id in _abandoned):
        return _run_on_ray(stage, config, inputs, store, cluster, num_cpus, num_gpus, task_name, method, repair, run_id)


def _run_on_ray(
    stage: str, config: BaseModel, inputs: dict[str, BlobRef], store: StoreSpec, cluster: ClusterSpec,
    num_cpus: float, num_gpus: float, task_name: str | None, method: str | None, repair: bool, run_id: str | None,
) -> StageRecord:
    # "auto": CUDA if the worker Ray placed us on has it, else CPU (a GPU resource on a CUDA-less node).
    device = "auto" if num_gpus > 0 else "cpu"
    if cluster.progress:
        print_stage_line(stage, task_name, method, "running", f"on {num_cpus:g} CPU(s), {num_gpus:g} GPU(s)")
    _check_abandoned(run_id, stage)
    board = board_of(cluster.board)
    channel = board.queued((stage, task_name, method)) if board else None
    ref = _remote_execute.options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0).remote(
        store, stage, config, inputs, num_cpus, device, repair, channel
    )
    _track(run_id, ref)
    try:
        status, manifest_json, seconds, node, s3_retries = ray_get(ref)
    except Exception:
        if run_id is not None and run_id in _abandoned:
            raise StageAbandoned(f"stage {stage} of run {run_id} cancelled: {_abandoned[run_id]}") from None
        raise
    finally:
        _untrack(run_id, ref)
        if board:
            board.ended(channel)
    manifest = Manifest.model_validate_json(manifest_json)
    return StageRecord(stage, task_name, method, manifest.key, status, seconds, node, manifest.outputs, s3_retries)


__all__ = [
    "ClusterSpec", "StageAbandoned", "StageRecord", "abandon", "end_run", "execute", "read_json_output", "stage_task",
]
