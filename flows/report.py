"""The store side of the report (docs/design.md §1.3, §5.2 `report --json`): find the stages of a run and read
from the store what the report shows — the eval stages' scores.json, each task's metric (the data stage's
task.json), the last merge diagnostics when the run has them, and every stage's manifest times for the timeline —
so `many report` needs nothing but cached stages. Everything else — the accuracy matrices, the UCIT metrics, the
terminal and markdown tables, heatmaps, forgetting curves, the diagnostics summary, the timeline figure and the HTML
page — is `many.report`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from many.data.io import TASK_FILE
from many.report import IncompleteScores, StageSpan, diagnostics_summary, report_from_scores
from tasks.record import StageRecord, read_json_output
from tasks.rows.many import DIAGNOSTICS_CHAIN
from tasks.store import Manifest, Store, StoreError


def task_metrics(store: Store, data: Sequence[StageRecord | Manifest]) -> list[str]:
    """Each task's metric ("exact_match" or "caption") from its data stage's output: the task directory's
    task.json (two small blobs per task: the directory listing and task.json; no split is downloaded)."""
    metrics = []
    for record in data:
        context = f"stage {record.stage}, key {record.key[:12]}, output task"
        listing = store.read_listing(record.outputs["task"], context=context)
        if TASK_FILE not in listing.files:
            raise StoreError(f"{context}: the task directory in store {store.url} has no {TASK_FILE}")
        header = json.loads(store.get_bytes(listing.files[TASK_FILE].digest, context=f"{context}, file {TASK_FILE}"))
        metrics.append(header["metric"])
    return metrics


def build_report(
    store: Store,
    tasks: Sequence[str],
    methods: Sequence[str],
    evals: Sequence[tuple[str, int, StageRecord | Manifest]],
    data: Sequence[StageRecord | Manifest] | None = None,
    diagnostics: StageRecord | Manifest | None = None,
) -> dict[str, Any]:
    """many.report.report_from_scores of the scores.json that each eval (method, row t, its record or manifest)
    stored, with the tasks' metrics read from `data` (each task's data stage, in task order) when given, plus the
    summary of `diagnostics` (the last merge_diagnostics link) if given; StoreError when the evals do not fill
    every method's accuracy matrix."""
    scores = [(method, t, read_json_output(store, record, "scores")) for method, t, record in evals]
    metrics = None if data is None else task_metrics(store, data)
    try:
        report = report_from_scores(tasks, methods, scores, metrics)
    except IncompleteScores as error:
        raise StoreError(f"{error} in store {store.url}; rerun `many run` to complete the stream") from None
    return report if diagnostics is None else with_diagnostics(store, report, diagnostics)


def with_diagnostics(store: Store, report: dict[str, Any], diagnostics: StageRecord | Manifest) -> dict[str, Any]:
    """The report with "diagnostics": many.report.diagnostics_summary of that stage's diagnostics.json."""
    stored = read_json_output(store, diagnostics, DIAGNOSTICS_CHAIN.read)
    return {**report, "diagnostics": diagnostics_summary(report["tasks"], stored)}


def last_diagnostics(chains: Mapping[str, Sequence[Any]]) -> Any | None:
    """The last link of the merge diagnostics chain among a run's submitted chains (by stage name), or None."""
    links = chains.get(DIAGNOSTICS_CHAIN.stage)
    return links[-1] if links else None


def _diagnostics_manifest(store: Store, summary: dict[str, Any]) -> Manifest | None:
    """The manifest of the run's last merge_diagnostics link (after its last task), None if the run has none."""
    entry = next((e for e in summary["stages"]
                  if e["stage"] == DIAGNOSTICS_CHAIN.stage and e["task"] == summary["tasks"][-1]), None)
    return None if entry is None else _manifest(store, entry)


def _manifest(store: Store, entry: dict[str, Any]) -> Manifest:
    manifest = store.read_manifest(entry["stage"], entry["key"])
    if manifest is None:
        of = (f" of {entry['method']}" if entry.get("method") else "") + (f" on {entry['task']}" if entry.get("task") else "")
        raise StoreError(
            f"{entry['stage']} stage {entry['key'][:12]}{of} is no longer in the store {store.url} (collected?); "
            f"rerun `many run`"
        )
    return manifest


def report_from_run(store: Store, summary: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a run's report from the eval and data manifests its summary lists (`many report`)."""
    tasks = summary["tasks"]
    evals = [
        (entry["method"], tasks.index(entry["task"]), _manifest(store, entry))
        for entry in summary["stages"] if entry["stage"] == "eval"
    ]
    data_entries = {entry["task"]: entry for entry in summary["stages"] if entry["stage"] == "data"}
    data = [_manifest(store, data_entries[task]) for task in tasks] if set(tasks) <= set(data_entries) else None
    return build_report(store, tasks, summary["methods"], evals, data, _diagnostics_manifest(store, summary))


def stage_span(manifest: Manifest, task: str | None, method: str | None, cached: bool = False) -> StageSpan:
    """A stage on the timeline: it ended when its manifest was written (`created`) and started `seconds` (its
    compute time) before; the manifest has no start time of its own."""
    end = datetime.fromisoformat(manifest.created).timestamp()
    return StageSpan(manifest.stage, task, method, manifest.host, end - manifest.seconds, end, cached)


def timeline_from_run(store: Store, summary: dict[str, Any]) -> list[StageSpan]:
    """One StageSpan per stage the run summary lists, from its manifest (a cached stage: when it was computed,
    possibly by an earlier run), in the summary's order. The manifests are read 16 at a time (one small GET each
    on S3). Stages whose manifest is gone are left out: the timeline is a view, not the report."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in summary["stages"]:
        first.setdefault((entry["stage"], entry["key"]), entry)
    entries = list(first.values())
    with ThreadPoolExecutor(max_workers=16) as pool:
        manifests = list(pool.map(lambda e: store.read_manifest(e["stage"], e["key"]), entries))
    return [
        stage_span(manifest, entry.get("task"), entry.get("method"), entry.get("status") == "cached")
        for entry, manifest in zip(entries, manifests, strict=True) if manifest is not None
    ]


def loss_curves(store: Store, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The loss curve of every training stage a run lists (the stage kinds with a `losses` output: base, finetune,
    seqlora, cram, fwd_prompt), in the run's order, as many.report.losses_png reads them: {"stage", "task",
    "method", "step", "loss"}. A stage whose manifest is gone or has no `losses` (written by an older version) is
    left out: the curves are a diagnosis, the scores are the report."""
    import pyarrow as pa

    from many.progress import read_losses
    from tasks.catalog import stage_def

    def trains(stage: str) -> bool:
        try:
            return "losses" in stage_def(stage, {}).outputs
        except ValueError:  # a stage kind this code does not know (a row loaded elsewhere)
            return False

    kinds = {entry["stage"] for entry in summary["stages"]}
    training = {kind for kind in kinds if trains(kind)}
    entries = [entry for entry in summary["stages"] if entry["stage"] in training]

    def curve(entry: dict[str, Any]) -> dict[str, Any] | None:
        manifest = store.read_manifest(entry["stage"], entry["key"])
        if manifest is None or "losses" not in manifest.outputs:
            return None
        context = f"stage {entry['stage']}, key {entry['key'][:12]}, output losses"
        table = read_losses(pa.BufferReader(store.get_bytes(manifest.outputs["losses"].digest, context=context)))
        columns = table.to_pydict()
        return {"stage": entry["stage"], "task": entry.get("task"), "method": entry.get("method"),
                "step": columns["step"], "loss": columns["loss"]}

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [found for found in pool.map(curve, entries) if found is not None]
