"""The report (DESIGN.md §1 "Metrics", §5 `report --json`): per method the accuracy matrix A[t][j] (percent,
task j after learning tasks ≤ t; null above the diagonal) and MFT / MFN / MAA / BWT — built from the eval
stages' score blobs only, so `many report` needs nothing but the store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from many.metrics import summarize
from tasks.stages import StageRecord, read_json_output
from tasks.store import Manifest, Store, StoreError

SUMMARY_KEYS = ("MFT", "MFN", "MAA", "BWT")


def build_report(
    store: Store, tasks: Sequence[str], methods: Sequence[str], evals: Sequence[tuple[str, int, StageRecord | Manifest]]
) -> dict[str, Any]:
    """{"tasks": [...], "methods": {method: {"matrix", "MFT", "MFN", "MAA", "BWT"}}} from eval outputs."""
    T = len(tasks)
    matrices: dict[str, list[list[float | None]]] = {m: [[None] * T for _ in range(T)] for m in methods}
    for method, t, record in evals:
        scores = read_json_output(store, record, "scores")
        if scores["tasks"] != list(tasks[: t + 1]):
            raise StoreError(f"eval of {method} at row {t} scored tasks {scores['tasks']}, expected {list(tasks[: t + 1])}")
        matrices[method][t][: t + 1] = [float(s) for s in scores["scores"]]
    report: dict[str, Any] = {"tasks": list(tasks), "methods": {}}
    for method in methods:
        matrix = matrices[method]
        complete = all(matrix[t][j] is not None for t in range(T) for j in range(t + 1))
        summary = summarize(matrix) if complete else dict.fromkeys(SUMMARY_KEYS)
        report["methods"][method] = {"matrix": matrix, **summary}
    return report


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
    head = f"{'method':<{width}}  " + "  ".join(f"{k:>6}" for k in SUMMARY_KEYS) + "   last row (" + ", ".join(tasks) + ")"
    lines = [head, "-" * len(head)]
    for method, row in report["methods"].items():
        last = row["matrix"][-1] if row["matrix"] else []
        values = "  ".join(f"{_number(row[k], k == 'BWT'):>6}" for k in SUMMARY_KEYS)
        lines.append(f"{method:<{width}}  {values}   " + " ".join(_number(v) for v in last))
    return "\n".join(lines)


def markdown_table(report: dict[str, Any]) -> str:
    """Summary table plus one accuracy matrix per method, in markdown (the Prefect artifact)."""
    tasks = report["tasks"]
    out = ["| method | MFT | MFN (Last) | MAA | BWT |", "|---|---|---|---|---|"]
    for method, row in report["methods"].items():
        out.append(f"| {method} | " + " | ".join(_number(row[k], k == "BWT") for k in SUMMARY_KEYS) + " |")
    for method, row in report["methods"].items():
        out += ["", f"**{method}** — A[t][j] after learning tasks ≤ t", "",
                "| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for t, values in enumerate(row["matrix"]):
            out.append(f"| {tasks[t]} | " + " | ".join(_number(v) for v in values) + " |")
    return "\n".join(out)


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """report.json, report.md, and a heat map of every method's matrix (matrices.png) under `out_dir`."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "report.md", out_dir / "matrices.png", out_dir / "summary.png"]
    written[0].write_text(json.dumps(report, indent=2))
    written[1].write_text(markdown_table(report) + "\n")
    methods = list(report["methods"])
    tasks = report["tasks"]
    columns = min(4, len(methods))
    rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in report["methods"][method]["matrix"]], dtype=float)
        ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
        for (t, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(j, t, f"{value:.0f}", ha="center", va="center", fontsize=6, color="white")
    fig.tight_layout()
    fig.savefig(written[2], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(methods), 3.0))
    values = [report["methods"][m]["MFN"] or 0.0 for m in methods]
    ax.bar(range(len(methods)), values)
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("MFN (Last), %")
    fig.tight_layout()
    fig.savefig(written[3], dpi=120)
    plt.close(fig)
    return written
