"""The store side of the report (docs/design.md §1 "Metrics", §5 `report --json`): find the eval stages of a run and
read their scores.json from the store, so `many report` needs nothing but cached stages. Everything else — the
accuracy matrices, the UCIT metrics, the terminal and markdown tables, heatmaps, forgetting curves and HTML page —
is `many.report`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from many.report import IncompleteScores, report_from_scores
from tasks.dispatch import StageRecord, read_json_output
from tasks.store import Manifest, Store, StoreError


def build_report(
    store: Store, tasks: Sequence[str], methods: Sequence[str], evals: Sequence[tuple[str, int, StageRecord | Manifest]]
) -> dict[str, Any]:
    """many.report.report_from_scores of the scores.json that each eval (method, row t, its record or manifest)
    stored; StoreError when the evals do not fill every method's accuracy matrix."""
    scores = [(method, t, read_json_output(store, record, "scores")) for method, t, record in evals]
    try:
        return report_from_scores(tasks, methods, scores)
    except IncompleteScores as error:
        raise StoreError(f"{error} in store {store.url}; rerun `many run` to complete the stream") from None


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
    return build_report(store, tasks, summary["methods"], evals)
