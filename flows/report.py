"""The store side of the report (docs/design.md §1 "Metrics", §5 `report --json`): find the eval stages of a run and
read their scores.json from the store, and the last merge diagnostics when the run has them, so `many report` needs
nothing but cached stages. Everything else — the accuracy matrices, the UCIT metrics, the terminal and markdown
tables, heatmaps, forgetting curves, the diagnostics summary and HTML page — is `many.report`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from many.report import IncompleteScores, diagnostics_summary, report_from_scores
from tasks.dispatch import StageRecord, read_json_output
from tasks.rows.many import DIAGNOSTICS_CHAIN
from tasks.store import Manifest, Store, StoreError


def build_report(
    store: Store, tasks: Sequence[str], methods: Sequence[str], evals: Sequence[tuple[str, int, StageRecord | Manifest]],
    diagnostics: StageRecord | Manifest | None = None,
) -> dict[str, Any]:
    """many.report.report_from_scores of the scores.json that each eval (method, row t, its record or manifest)
    stored, plus the summary of `diagnostics` (the last merge_diagnostics link) if given; StoreError when the evals
    do not fill every method's accuracy matrix."""
    scores = [(method, t, read_json_output(store, record, "scores")) for method, t, record in evals]
    try:
        report = report_from_scores(tasks, methods, scores)
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
    if entry is None:
        return None
    manifest = store.read_manifest(DIAGNOSTICS_CHAIN.stage, entry["key"])
    if manifest is None:
        raise StoreError(f"{DIAGNOSTICS_CHAIN.stage} stage {entry['key'][:12]} on {entry['task']} is no longer in the "
                         f"store {store.url} (collected?); rerun `many run`")
    return manifest


def report_from_run(store: Store, summary: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a run's report from the eval manifests its summary lists (`many report`)."""
    tasks = summary["tasks"]
    evals = []
    for entry in summary["stages"]:
        if entry["stage"] != "eval":
            continue
        manifest = store.read_manifest("eval", entry["key"])
        if manifest is None:
            raise StoreError(
                f"eval stage {entry['key'][:12]} of {entry['method']} on {entry['task']} is no longer in the store "
                f"{store.url} (collected?); rerun `many run`"
            )
        evals.append((entry["method"], tasks.index(entry["task"]), manifest))
    return build_report(store, tasks, summary["methods"], evals, _diagnostics_manifest(store, summary))
