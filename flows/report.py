"""The pipeline side of the report (DESIGN.md §1 "Metrics", §5 `report --json`): collect every method's accuracy
matrix A[t][j] (percent, task j after learning tasks ≤ t) from the eval stages' score blobs in the store, so
`many report` needs nothing but cached stages. The report JSON, markdown, heatmaps, forgetting curves and HTML
page come from `many.report`; this module adds only the store access and the terminal table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from many.report import METRICS, build_report as report_of_matrices
from tasks.dispatch import StageRecord, read_json_output
from tasks.store import Manifest, Store, StoreError

EXTRA_FIELDS = ("trainable_parameters",)  # scalars of an eval's scores.json that the report shows per method


def build_report(
    store: Store, tasks: Sequence[str], methods: Sequence[str], evals: Sequence[tuple[str, int, StageRecord | Manifest]]
) -> dict[str, Any]:
    """{"tasks": [...], "methods": {method: {"matrix", "MFT", "MFN", "MAA", "BWT", **extras}}} from eval outputs.

    Extras: the scalar fields of EXTRA_FIELDS that a method's last-row eval wrote (CRAM's and Fwd-Prompt's
    trainable_parameters after the whole stream), shown beside the accuracy columns."""
    T = len(tasks)
    matrices: dict[str, list[list[float | None]]] = {m: [[None] * T for _ in range(T)] for m in methods}
    extras: dict[str, dict[str, Any]] = {}
    for method, t, record in evals:
        scores = read_json_output(store, record, "scores")
        if scores["tasks"] != list(tasks[: t + 1]):
            raise StoreError(f"eval of {method} at row {t} scored tasks {scores['tasks']}, expected {list(tasks[: t + 1])}")
        matrices[method][t][: t + 1] = [float(s) for s in scores["scores"]]
        if t == T - 1 and any(k in scores for k in EXTRA_FIELDS):
            extras[method] = {k: scores[k] for k in EXTRA_FIELDS if k in scores}
    for method, matrix in matrices.items():
        missing = [t for t in range(T) if matrix[t][t] is None]
        if missing:
            raise StoreError(
                f"report: no eval of {method} after task(s) {[tasks[t] for t in missing]} in store {store.url}; "
                f"rerun `many run` to complete the stream"
            )
    return report_of_matrices(tasks, matrices, extras)


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


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def text_table(report: dict[str, Any]) -> str:
    """The comparison table printed at the end of `many run` and by `many report`."""
    tasks = report["tasks"]
    width = max([len(m) for m in report["methods"]] + [8])
    extras = [k for k in EXTRA_FIELDS if any(k in row for row in report["methods"].values())]
    head = (f"{'method':<{width}}  " + "  ".join(f"{k:>6}" for k in METRICS) + "".join(f"  {k}" for k in extras)
            + "   last row (" + ", ".join(tasks) + ")")
    lines = [head, "-" * len(head)]
    for method, row in report["methods"].items():
        last = row["matrix"][-1] if row["matrix"] else []
        values = "  ".join(f"{_number(row[k], k == 'BWT'):>6}" for k in METRICS)
        values += "".join(f"  {'–' if row.get(k) is None else f'{row[k]:,}':>{len(k)}}" for k in extras)
        lines.append(f"{method:<{width}}  {values}   " + " ".join(_number(v) for v in last))
    return "\n".join(lines)
