"""The report of a continual run: accuracy matrices, UCIT metrics, tables and plots (docs/design.md §1.3, §5
`many report`). The one owner of the report: flows/report.py only reads from the store what it shows (the eval
scores, the tasks' metrics, the stages' manifest times).

One method's accuracy matrix A (T×T, percent) holds A[t][j] = score on task j after learning tasks 0..t; only the
lower triangle j ≤ t is read. `report_from_scores` builds it from the eval stages' scores.json (row t = the scores
of eval[t][method]), `report_from_matrices` from the matrices themselves. The report is plain JSON
(docs/design.md §5.2):

    {"tasks": [names], "task_metrics"?: [metric per task], "methods": {name: {"matrix": A, "MFT", "MFN", "MAA",
                                                                              "BWT", **extras}}}

with MFT = mean_t A[t][t], MFN ("Last") = mean_j A[T−1][j], MAA = mean_t mean_{j≤t} A[t][j] and
BWT = mean_{j<T−1} (A[T−1][j] − A[j][j]) from `many.metrics.summarize`; entries above the diagonal are null.
`extras` are per-method scalars the pipeline adds (e.g. "trainable_parameters", "tau"), shown as extra columns.
`task_metrics` (when the caller knows them: the pipeline reads them from the data stages) says how each task is
scored, "exact_match" (percent) or "caption" (100 × mean of BLEU-1..4, METEOR, ROUGE-L, CIDEr: can exceed 100);
the tables and figures mark caption tasks with "†". Every table and page explains the four metrics (`LEGEND`).

A run with LPM merge diagnostics adds "diagnostics" (`diagnostics_summary`, below render): the last step's fit error
per layer and task, drawn as a layer × task heatmap (diagnostics.png), and its worst layers, also in `text_table`.

`text_table` is the terminal table of `many run` and `many report`; `markdown_table` and `matrix_markdown` the
markdown. Rendering (`render`) writes report.json, report.md, one heatmap PNG per method (one colour scale shared
by every method), forgetting.png, with a run's stage spans (`StageSpan`) timeline.png, and a self-contained
report.html. Figures use matplotlib's object API (`Figure`, Agg), never pyplot, so no global
backend or figure state is touched.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, get_args

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from many.data.schema import Metric
from many.metrics import summarize

METRICS = ("MFT", "MFN", "MAA", "BWT")
METRIC_HEADERS = {"MFT": "MFT", "MFN": "MFN (Last)", "MAA": "MAA", "BWT": "BWT"}
RESERVED_FIELDS = ("matrix", *METRICS)
SCORE_EXTRAS = ("trainable_parameters", "bytes_per_task")  # scalars of an eval's scores.json that the report shows per method
Extra = bool | int | float | str | None

CAPTION_MARK = "†"
# One line per metric (docs/design.md §1.3), in every table and page of the report; A is 0-based, T tasks.
LEGEND = (
    ("A[t][j]", "score on task j after learning tasks 0..t (rows: after learning; columns: evaluated on)"),
    ("MFT", "mean of the diagonal A[t][t]: each task's score right after learning it (plasticity)"),
    ("MFN (Last)", "mean of the last row A[T−1][j]: every task's score after learning the whole stream"),
    ("MAA", "mean over t of the mean of A[t][j≤t]: the average over the tasks learned so far, along the stream"),
    ("BWT", "mean over j<T−1 of A[T−1][j] − A[j][j]: change since each task was learned; negative = forgetting"),
)
CAPTION_SCORE = "100 × mean of BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr is 0–10, so it can exceed 100)"


class IncompleteScores(ValueError):
    """The eval scores given to `report_from_scores` do not fill every method's accuracy matrix: a method lacks
    the eval of some row t, or an eval scored other tasks than the first t + 1."""


def _validated_matrix(
    method: str, tasks: Sequence[str], matrix: Sequence[Sequence[object]]
) -> list[list[float | None]]:
    """A[t][j] as floats for j ≤ t and None above the diagonal; ValueError naming the method and the entry."""
    T = len(tasks)
    if len(matrix) != T:
        raise ValueError(
            f"method {method!r}: accuracy matrix has {len(matrix)} rows for {T} tasks; need one row per task "
            f"(row t = scores after learning tasks 0..t)"
        )
    rows: list[list[float | None]] = []
    for t, row in enumerate(matrix):
        if len(row) != T:
            raise ValueError(
                f"method {method!r}: accuracy matrix row {t} (after {tasks[t]!r}) has {len(row)} entries, "
                f"expected {T} (one per task, None above the diagonal)"
            )
        for j in range(t + 1):
            value = row[j]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(
                    f"method {method!r}: A[{t}][{j}] (on {tasks[j]!r} after {tasks[t]!r}) is {value!r}; every "
                    f"score on a learned task (j ≤ t) must be a finite number"
                )
        rows.append([float(row[j]) if j <= t else None for j in range(T)])  # type: ignore[arg-type]
    return rows


def _validated_extras(method: str, fields: Mapping[str, object]) -> dict[str, Extra]:
    """Scalar extra fields as plain Python values; ValueError for a reserved name or a non-scalar value."""
    checked: dict[str, Extra] = {}
    for key, value in fields.items():
        if not isinstance(key, str) or key in RESERVED_FIELDS:
            raise ValueError(
                f"method {method!r}: extra field {key!r} is not allowed; use a string other than "
                f"{', '.join(RESERVED_FIELDS)}"
            )
        scalar = value is None or isinstance(value, (bool, str, numbers.Real))
        if not scalar or (isinstance(value, numbers.Real) and not math.isfinite(value)):
            raise ValueError(
                f"method {method!r}: extra field {key!r} is {value!r}; extras must be finite numbers, strings, "
                f"booleans or None"
            )
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
        checked[key] = value  # type: ignore[assignment]
    return checked


def _validated_metrics(tasks: Sequence[str], task_metrics: Sequence[str]) -> list[str]:
    known = get_args(Metric)
    metrics = list(task_metrics)
    if len(metrics) != len(tasks):
        raise ValueError(f"report: {len(metrics)} task metrics for {len(tasks)} tasks; give one metric per task")
    for name, metric in zip(tasks, metrics, strict=True):
        if metric not in known:
            raise ValueError(f"report: task {name!r} has metric {metric!r}; known: {', '.join(known)}")
    return metrics


def report_from_matrices(
    tasks: Sequence[str],
    matrices: Mapping[str, Sequence[Sequence[float | None]]],
    extras: Mapping[str, Mapping[str, object]] | None = None,
    task_metrics: Sequence[str] | None = None,
) -> dict:
    """The report JSON of docs/design.md §5.2 for the given task order and per-method accuracy matrices (percent).

    Methods keep the mapping's order. `extras[method]` adds scalar fields to that method's entry;
    `task_metrics` (one per task, "exact_match" or "caption") adds the top-level "task_metrics".
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("report: no tasks; give the stream's task names in order")
    for i, name in enumerate(tasks):
        if not isinstance(name, str) or not name:
            raise ValueError(f"report: task {i} has name {name!r}; task names must be non-empty strings")
    if len(set(tasks)) != len(tasks):
        duplicates = sorted({name for name in tasks if tasks.count(name) > 1})
        raise ValueError(f"report: duplicate task names {duplicates}; each task of the stream needs its own name")
    if not matrices:
        raise ValueError("report: no methods; give at least one method's accuracy matrix")
    extras = extras or {}
    unknown = [name for name in extras if name not in matrices]
    if unknown:
        raise ValueError(f"report: extras for unknown methods {unknown}; known: {', '.join(matrices)}")
    methods: dict[str, dict] = {}
    for method, matrix in matrices.items():
        if not isinstance(method, str) or not method:
            raise ValueError(f"report: method name {method!r}; method names must be non-empty strings")
        rows = _validated_matrix(method, tasks, matrix)
        methods[method] = {"matrix": rows, **summarize(rows), **_validated_extras(method, extras.get(method, {}))}
    if task_metrics is None:
        return {"tasks": tasks, "methods": methods}
    return {"tasks": tasks, "task_metrics": _validated_metrics(tasks, task_metrics), "methods": methods}


def report_from_scores(
    tasks: Sequence[str],
    methods: Sequence[str],
    scores: Iterable[tuple[str, int, Mapping[str, Any]]],
    task_metrics: Sequence[str] | None = None,
) -> dict:
    """The report of `methods` from their eval scores: (method, t, scores.json of eval[t][method]) per eval, where
    scores.json is {"tasks": tasks[:t+1], "scores": [percent per task], **fields}; row t of the method's matrix.

    Extras: the SCORE_EXTRAS fields that a method's last-row eval wrote (CRAM's and Fwd-Prompt's
    trainable_parameters after the whole stream), shown beside the accuracy columns. `task_metrics` as in
    `report_from_matrices`. IncompleteScores when an eval scored other tasks than tasks[:t+1] or a method has no
    eval for some row.
    """
    tasks = list(tasks)
    T = len(tasks)
    matrices: dict[str, list[list[float | None]]] = {m: [[None] * T for _ in range(T)] for m in methods}
    extras: dict[str, dict[str, Any]] = {}
    for method, t, row in scores:
        if row["tasks"] != tasks[: t + 1]:
            raise IncompleteScores(
                f"report: eval of {method} at row {t} scored tasks {row['tasks']}, expected {tasks[: t + 1]}"
            )
        matrices[method][t][: t + 1] = [float(s) for s in row["scores"]]
        if t == T - 1 and any(k in row for k in SCORE_EXTRAS):
            extras[method] = {k: row[k] for k in SCORE_EXTRAS if k in row}
    for method, matrix in matrices.items():
        missing = [t for t in range(T) if matrix[t][t] is None]
        if missing:
            raise IncompleteScores(f"report: no eval of {method} after task(s) {[tasks[t] for t in missing]}")
    return report_from_matrices(tasks, matrices, extras, task_metrics)


def _number(value: float) -> str:
    """One decimal, no negative zero: the markdown, HTML and figure labels."""
    return f"{round(value, 1) + 0.0:.1f}"


def _terminal_number(value: float | None, signed: bool = False) -> str:
    """One decimal as Python formats it ("-0.0" kept), "+" in front when `signed`, "–" for None: `text_table`."""
    if value is None:
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _extra_text(value: Extra) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _extra_fields(report: Mapping) -> list[str]:
    """Extra field names in order of first appearance over the methods."""
    names: dict[str, None] = {}
    for entry in report["methods"].values():
        names |= {key: None for key in entry if key not in RESERVED_FIELDS}
    return list(names)


def _caption_tasks(report: Mapping) -> set[int] | None:
    """Indices of the caption tasks; None when the report does not say how its tasks are scored."""
    metrics = report.get("task_metrics")
    return None if metrics is None else {j for j, metric in enumerate(metrics) if metric == "caption"}


def task_labels(report: Mapping) -> list[str]:
    """Task names, a caption task's followed by " †" (its score is not a percentage)."""
    captions = _caption_tasks(report) or set()
    return [f"{task} {CAPTION_MARK}" if j in captions else task for j, task in enumerate(report["tasks"])]


def score_note(report: Mapping) -> str:
    """What the scores are: exact match in percent, and the caption score for the tasks marked †."""
    captions = _caption_tasks(report)
    if captions is None:
        return f"exact match in % for QA tasks; caption tasks: {CAPTION_SCORE}"
    if not captions:
        return "exact match in % (every task)"
    return f"exact match in %; {CAPTION_MARK} caption tasks: {CAPTION_SCORE}"


def score_label(report: Mapping) -> str:
    """The axis / colour bar label of a score."""
    captions = _caption_tasks(report)
    if captions is None:
        return "score (% for exact match; caption score ×100 for caption tasks)"
    if not captions:
        return "exact match (%)"
    if len(captions) == len(report["tasks"]):
        return "caption score (×100)"
    return f"score (% for exact match; caption score ×100 for {CAPTION_MARK} tasks)"


def legend_lines(report: Mapping) -> list[tuple[str, str]]:
    """(term, one-line definition): the accuracy matrix, MFT, MFN (Last), MAA, BWT, then what the scores are."""
    return [*LEGEND, ("scores", score_note(report))]


def _summary(report: Mapping) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, cell texts and "has the best Last" per method: final score per task, metrics, extras."""
    extra_fields = _extra_fields(report)
    header = ["method", *task_labels(report), *(METRIC_HEADERS[m] for m in METRICS), *extra_fields]
    best_last = max(entry["MFN"] for entry in report["methods"].values())
    rows, best = [], []
    for method, entry in report["methods"].items():
        final = entry["matrix"][-1]
        rows.append(
            [
                method,
                *(_number(score) for score in final),
                *(_number(entry[m]) for m in METRICS),
                *(_extra_text(entry.get(field)) for field in extra_fields),
            ]
        )
        best.append(math.isclose(entry["MFN"], best_last, rel_tol=0.0, abs_tol=1e-9))
    return header, rows, best


def text_table(report: Mapping) -> str:
    """The comparison table printed at the end of `many run` and by `many report`: per method MFT, MFN, MAA, BWT,
    the SCORE_EXTRAS any method has, and its last row of scores; then one line per metric (`legend_lines`)."""
    tasks = task_labels(report)
    width = max([len(m) for m in report["methods"]] + [8])
    extras = [k for k in SCORE_EXTRAS if any(k in row for row in report["methods"].values())]
    head = (f"{'method':<{width}}  " + "  ".join(f"{k:>6}" for k in METRICS) + "".join(f"  {k}" for k in extras)
            + "   last row (" + ", ".join(tasks) + ")")
    lines = [head, "-" * len(head)]
    for method, row in report["methods"].items():
        last = row["matrix"][-1] if row["matrix"] else []
        values = "  ".join(f"{_terminal_number(row[k], k == 'BWT'):>6}" for k in METRICS)
        values += "".join(f"  {'–' if row.get(k) is None else f'{row[k]:,}':>{len(k)}}" for k in extras)
        lines.append(f"{method:<{width}}  {values}   " + " ".join(_terminal_number(v) for v in last))
    legend = legend_lines(report)
    term_width = max(len(term) for term, _ in legend)
    lines += ["", *(f"{term:<{term_width}}  {text}" for term, text in legend)]
    return "\n".join(lines + diagnostics_lines(report))


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def markdown_legend(report: Mapping) -> str:
    """`legend_lines` as a markdown list."""
    return "".join(f"- **{_md_cell(term)}**: {_md_cell(text)}\n" for term, text in legend_lines(report))


def markdown_table(report: Mapping) -> str:
    """One row per method: final score per task (caption tasks marked †), MFT, MFN (Last), MAA, BWT, extras; the
    best Last in bold. `markdown_legend` explains the columns."""
    header, rows, best = _summary(report)
    last = header.index(METRIC_HEADERS["MFN"])
    for row, is_best in zip(rows, best, strict=True):
        if is_best:
            row[last] = f"**{row[last]}**"
    return _md_table(header, rows)


def _entry(report: Mapping, method: str) -> Mapping:
    if method not in report["methods"]:
        raise ValueError(f"report: unknown method {method!r}; known: {', '.join(report['methods'])}")
    return report["methods"][method]


def matrix_markdown(report: Mapping, method: str) -> str:
    """The lower-triangular accuracy matrix of one method, rows labelled "after <task>"."""
    matrix = _entry(report, method)["matrix"]
    rows = [
        [f"after {task}", *(_number(v) if v is not None else "" for v in row)]
        for task, row in zip(report["tasks"], matrix, strict=True)
    ]
    return _md_table(["", *task_labels(report)], rows)


def _plain(text: str) -> str:
    """Text for a matplotlib label: "$" escaped, so a name with two dollars is not parsed as mathtext."""
    return text.replace("$", r"\$")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def score_scale(report: Mapping) -> tuple[float, float]:
    """(vmin, vmax) of every heatmap of the report: 0 … the largest score of any method, at least 100 (caption
    scores can exceed 100). One scale for all methods, so one colour is one score across the heatmaps."""
    scores = [v for entry in report["methods"].values() for row in entry["matrix"] for v in row if v is not None]
    return 0.0, max([100.0, *scores])


def _heatmap_figure(report: Mapping, method: str, scale: tuple[float, float]) -> Figure:
    """Accuracy matrix as an image: rows = after learning task t, columns = evaluated on task j; j > t blank.
    Colours span `scale` (`score_scale`: shared by every method of the report)."""
    entry = _entry(report, method)
    tasks = report["tasks"]
    T = len(tasks)
    vmin, vmax = scale
    values = np.array([[np.nan if v is None else v for v in row] for row in entry["matrix"]])  # (T, T)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    side = 2.2 + 0.9 * T
    figure = Figure(figsize=(side + 1.6, side), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    for t in range(T):
        for j in range(t + 1):
            r, g, b, _ = cmap(image.norm(values[t, j]))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, t, _number(values[t, j]), ha="center", va="center", color=ink, fontsize=10)
    ax.set_xticks(range(T), [_plain(task) for task in task_labels(report)], rotation=35, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(T), [_plain(f"after {task}") for task in tasks])
    ax.set_xlabel("evaluated on")
    ax.set_title(f"{_plain(method)} — Last {_number(entry['MFN'])}")
    figure.colorbar(image, ax=ax, label=_plain(score_label(report)), shrink=0.8)
    return figure


def _forgetting_figure(report: Mapping) -> Figure:
    """One panel per task j: its score after each learning step t ≥ j, one line per method.

    Panels per task (not per method) put every method's curve for the same task on the same axis and the same
    metric (exact match or caption score), so 8–10 methods compare directly; panels per method would force
    comparisons across 8–10 panels and mix metric scales within one.
    """
    tasks, methods = report["tasks"], report["methods"]
    labels, captions = task_labels(report), _caption_tasks(report)
    T = len(tasks)
    columns = min(3, T)
    panel_rows = math.ceil(T / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * panel_rows + 0.9), layout="constrained")
    axes = figure.subplots(panel_rows, columns, squeeze=False, sharex=True)
    colors = colormaps["tab10"].colors
    markers = "osD^v<>ph*"
    for j, task in enumerate(tasks):
        ax = axes[j // columns][j % columns]
        for k, (method, entry) in enumerate(methods.items()):
            steps = list(range(j, T))
            ax.plot(
                [t + 1 for t in steps],
                [entry["matrix"][t][j] for t in steps],
                color=colors[k % len(colors)],
                marker=markers[k % len(markers)],
                markersize=5,
                linewidth=1.6,
                label=_plain(method),
            )
        ax.set_title(_plain(f"{j + 1}. {labels[j]}"), fontsize=10)
        ax.set_xticks(range(1, T + 1))
        ax.set_xlim(0.7, T + 0.3)
        ax.grid(alpha=0.3)
        if captions is not None:  # each panel is one task: its own metric
            ax.set_ylabel("caption score (×100)" if j in captions else "exact match (%)")
        elif j % columns == 0:
            ax.set_ylabel("score (% or caption ×100)")
        if j // columns == panel_rows - 1 or j + columns >= T:
            ax.set_xlabel("tasks learned")
    for k in range(T, panel_rows * columns):
        axes[k // columns][k % columns].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(5, len(labels)), fontsize=9)
    figure.suptitle("Score per task along the stream")
    return figure


class StageSpan(NamedTuple):
    """One stage of a run on the timeline: when it computed (POSIX seconds) and where. `cached`: this run found it
    in the store, so the span is when an earlier run computed it."""

    stage: str
    task: str | None
    method: str | None
    host: str
    start: float
    end: float
    cached: bool = False


TIMELINE_CAPTION = (
    "One bar per stage, from its manifest: it ends when the manifest was written and starts its recorded seconds "
    "earlier. One lane group per host (Ray node); a host's concurrent stages stack in sub-lanes. The critical path "
    "runs back from the last bar to end through the bars that ended just before each one started. Colours are "
    "stage kinds (legend: count, total time). "
    "Stages this run found cached are drawn faded at the time they were computed, possibly by an earlier run."
)


def _spans(timeline: Iterable[Sequence[Any]]) -> list[StageSpan]:
    """StageSpan of each (stage, task, method, host, start, end[, cached]), sorted by start; ValueError naming a
    span with a non-finite time or an end before its start."""
    spans = []
    for item in timeline:
        span = StageSpan(*item)
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (span.start, span.end)):
            raise ValueError(f"timeline: stage {span.stage!r} has start {span.start!r}, end {span.end!r}; need finite "
                             f"POSIX seconds")
        if span.end < span.start:
            raise ValueError(f"timeline: stage {span.stage!r} ends ({span.end}) before it starts ({span.start})")
        spans.append(span._replace(start=float(span.start), end=float(span.end)))
    return sorted(spans, key=lambda s: (s.start, s.end, s.host, s.stage, s.task or "", s.method or ""))


def _lanes(spans: Sequence[StageSpan]) -> tuple[list[int], list[tuple[str, int, int]]]:
    """Each span's row (sorted spans in): per host, greedy sub-lanes so no two bars of one lane overlap; and per
    host (name, first row, row count), hosts in order of their first stage."""
    ends: dict[str, list[float]] = {}
    placed = []
    for span in spans:
        lanes = ends.setdefault(span.host, [])
        lane = next((k for k, end in enumerate(lanes) if end <= span.start), len(lanes))
        if lane == len(lanes):
            lanes.append(span.end)
        lanes[lane] = span.end
        placed.append((span.host, lane))
    groups, first = [], 0
    for host, lanes in ends.items():
        groups.append((host, first, len(lanes)))
        first += len(lanes)
    offset = {host: row for host, row, _ in groups}
    return [offset[host] + lane for host, lane in placed], groups


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _timeline_figure(timeline: Iterable[Sequence[Any]]) -> Figure:
    """The Gantt chart of a run's stages (`TIMELINE_CAPTION`); x = time since the first stage started."""
    spans = _spans(timeline)
    if not spans:
        raise ValueError("timeline: no stages to draw")
    rows, groups = _lanes(spans)
    origin = spans[0].start
    total = max(span.end for span in spans) - origin
    unit, per = ("s", 1.0) if total < 120 else ("min", 60.0) if total < 7200 else ("h", 3600.0)
    kinds = list(dict.fromkeys(span.stage for span in spans))
    palette = colormaps["tab20"].colors[::2] + colormaps["tab20"].colors[1::2]  # ten distinct, then their tints
    colour = {kind: palette[k % len(palette)] for k, kind in enumerate(kinds)}
    n_rows = sum(count for _, _, count in groups)
    width = 11.0
    figure = Figure(figsize=(width, 1.9 + 0.26 * n_rows), layout="constrained")
    ax = figure.add_subplot()
    extent = max(total, 1e-9) / per
    for span, row in zip(spans, rows, strict=True):
        left, length = (span.start - origin) / per, (span.end - span.start) / per
        ax.barh(row, length, left=left, height=0.8, color=colour[span.stage], alpha=0.4 if span.cached else 1.0,
                edgecolor="black", linewidth=0.3)
        label = span.method or span.task or ""
        if label and len(label) * 0.075 < 0.85 * width * length / extent:  # only where the text fits the bar
            ax.text(left + length / 2, row, _plain(label), ha="center", va="center", fontsize=6.5, clip_on=True)
    ax.set_yticks([row + (count - 1) / 2 for _, row, count in groups], [_plain(host) for host, _, _ in groups])
    for _, row, _ in groups[1:]:
        ax.axhline(row - 0.5, color="gray", linewidth=0.6)
    ax.set_ylim(n_rows - 0.5, -0.5)  # the first host on top
    ax.set_xlim(0.0, extent * 1.01)
    ax.grid(axis="x", alpha=0.3)
    started = datetime.fromtimestamp(origin, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    ax.set_xlabel(f"{unit} since the first stage started ({started})")
    busy = {kind: 0.0 for kind in kinds}
    count = {kind: 0 for kind in kinds}
    for span in spans:
        busy[span.stage] += span.end - span.start
        count[span.stage] += 1
    handles = [
        Patch(facecolor=colour[kind], edgecolor="black", linewidth=0.3,
              label=_plain(f"{kind} ×{count[kind]}, {_duration(busy[kind])}"))
        for kind in kinds
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(6, len(kinds)), fontsize=8)
    ax.set_title(f"Stage timeline — {len(spans)} stages, wall {_duration(total)}, "
                 f"stage time {_duration(sum(busy.values()))}")
    return figure


LossCurves = Sequence[Mapping[str, Any]]  # {"stage", "task", "method", "step": [int], "loss": [float]} per training stage


def losses_png(curves: LossCurves) -> bytes:
    """The training loss of every training stage: one panel per stage kind (base, finetune, seqlora, …, in order
    of first appearance), one line per task (the same colour for a task in every panel). The y axis is logarithmic
    when a panel's losses span more than a factor of 10 (a pretraining that starts at ln(vocabulary) and ends
    near 0). Curves without steps are left out; ValueError when none has any."""
    curves = [curve for curve in curves if len(curve["step"])]
    if not curves:
        raise ValueError("report: no loss curve has any step; pass the losses of at least one training stage")
    kinds = list(dict.fromkeys(curve["stage"] for curve in curves))
    names = list(dict.fromkeys(curve.get("task") or curve["stage"] for curve in curves))
    colors = colormaps["tab10"].colors
    columns = min(3, len(kinds))
    panel_rows = math.ceil(len(kinds) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.3 * panel_rows + 0.8), layout="constrained")
    axes = figure.subplots(panel_rows, columns, squeeze=False)
    for k, kind in enumerate(kinds):
        ax = axes[k // columns][k % columns]
        panel = [curve for curve in curves if curve["stage"] == kind]
        for curve in panel:
            name = curve.get("task") or curve["stage"]
            ax.plot(curve["step"], curve["loss"], color=colors[names.index(name) % len(colors)], linewidth=1.2,
                    label=_plain(name))
        losses = [value for curve in panel for value in curve["loss"] if math.isfinite(value)]
        if losses and min(losses) > 0 and max(losses) > 10 * min(losses):
            ax.set_yscale("log")
        method = panel[0].get("method")
        ax.set_title(_plain(kind if not method or method == kind else f"{kind} [{method}]"), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if k % columns == 0:
            ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    for k in range(len(kinds), panel_rows * columns):
        axes[k // columns][k % columns].set_visible(False)
    figure.suptitle("Training loss per stage")
    return _png(figure)


def file_stem(method: str) -> str:
    """A filename-safe, deterministic stem for a method name.

    Safe names ([A-Za-z0-9._-], no leading dot) are kept; any other name is cleaned and suffixed with 8 hex
    digits of sha256(name), so two names that clean to the same text still get distinct files.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", method)[:64]
    if cleaned == method and not method.startswith("."):
        return method
    return f"{cleaned.lstrip('.')}-{hashlib.sha256(method.encode()).hexdigest()[:8]}"


def _html_table(header: list[str], rows: list[list[str]], best: list[bool]) -> str:
    last = header.index(METRIC_HEADERS["MFN"])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row, is_best in zip(rows, best, strict=True):
        cells = [
            f"<td><strong>{html.escape(c)}</strong></td>" if is_best and i == last else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


HTML_STYLE = """body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin-bottom: 1.5em; }
dl.legend { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; margin-bottom: 1.5em; }
dl.legend dt { font-weight: bold; }
dl.legend dd { margin: 0; }"""


def _html_legend(report: Mapping) -> str:
    items = "".join(f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>" for term, text in legend_lines(report))
    return f'<dl class="legend">{items}</dl>'


def render(
    report: Mapping, out_dir: Path, timeline: Iterable[Sequence[Any]] | None = None, losses: LossCurves | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, heatmap_<method>.png per method (one colour scale for all), forgetting.png,
    diagnostics.png (with report["diagnostics"]),
    with a non-empty `timeline` (StageSpan or plain (stage, task, method, host, start, end[, cached]) per stage)
    timeline.png, and a self-contained report.html (tables, legend, every PNG as a base64 data URI) into
    `out_dir`; returns {file name: path}. With the training stages' loss curves (`losses`, see `losses_png`) also
    losses.png, in the markdown and the page.

    Every figure is rendered in memory first and report.json is written last, so a failure while plotting
    leaves no partial report behind.
    """
    out_dir = Path(out_dir)
    methods = list(report["methods"])
    stems = {method: file_stem(method) for method in methods}
    folded: dict[str, str] = {}
    for method, stem in stems.items():
        if stem.casefold() in folded:
            raise ValueError(
                f"report: methods {folded[stem.casefold()]!r} and {method!r} map to the same file name "
                f"heatmap_{stem}.png on case-insensitive file systems; rename one"
            )
        folded[stem.casefold()] = method
    scale = score_scale(report)
    heatmaps = {method: _png(_heatmap_figure(report, method, scale)) for method in methods}
    forgetting = _png(_forgetting_figure(report))
    spans = _spans(timeline or ())
    gantt = _png(_timeline_figure(spans)) if spans else None
    timeline_md = [f"## Stage timeline\n\n![stage timeline](timeline.png)\n\n{TIMELINE_CAPTION}\n"] if gantt else []
    timeline_html = (
        ["<h2>Stage timeline</h2>", _img(gantt, "stage timeline"), f"<p>{html.escape(TIMELINE_CAPTION)}</p>"]
        if gantt else []
    )
    diagnostics_files, diagnostics_md, diagnostics_html = _diagnostics_parts(report)
    trained = losses_png(losses) if losses and any(len(curve["step"]) for curve in losses) else None
    markdown = "\n".join(
        [
            "# many report\n",
            markdown_table(report),
            markdown_legend(report),
            "![forgetting curves](forgetting.png)\n",
            *(["![training loss](losses.png)\n"] if trained else []),
            *(
                f"## {_md_cell(m)}\n\n{matrix_markdown(report, m)}\n![{_md_cell(m)}](heatmap_{stems[m]}.png)\n"
                for m in methods
            ),
            *timeline_md,
            *diagnostics_md,
        ]
    )
    page = "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8"><title>many report</title>',
            f"<style>\n{HTML_STYLE}\n</style></head><body>",
            "<h1>many report</h1>",
            _html_table(*_summary(report)),
            _html_legend(report),
            "<h2>Forgetting curves</h2>",
            _img(forgetting, "forgetting curves"),
            *(["<h2>Training loss</h2>", _img(trained, "training loss per stage")] if trained else []),
            "<h2>Accuracy matrices</h2>",
            (
                f"<p>One colour scale for every method: {html.escape(score_label(report))}, "
                f"{_number(scale[0])} to {_number(scale[1])}.</p>"
            ),
            *(f"<h3>{html.escape(m)}</h3>\n{_img(heatmaps[m], f'accuracy matrix of {m}')}" for m in methods),
            *timeline_html,
            *diagnostics_html,
            "</body></html>\n",
        ]
    )
    files: dict[str, bytes] = {f"heatmap_{stems[m]}.png": heatmaps[m] for m in methods}
    files["forgetting.png"] = forgetting
    if gantt is not None:
        files["timeline.png"] = gantt
    files |= diagnostics_files
    if trained:
        files["losses.png"] = trained
    files["report.md"] = markdown.encode()
    files["report.html"] = page.encode()
    files["report.json"] = (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, content in files.items():
        written[name] = out_dir / name
        written[name].write_bytes(content)
    return written


# -- LPM merge diagnostics (docs/design.md §1.1 "Diagnostics") -------------------------------------------------------
#
# report["diagnostics"], present when the run computed merge_diagnostics (the `many` / `many_lpm_only` rows with
# lpm.diagnostics on), summarises the diagnostics.json of the run's last step (many.lpm_diagnostics):
#
#     {"after": last task, "tasks": [tasks merged], "groups": {group: [layers in model order]},
#      "fit_error": {"mean", "worst": [{"layer", "task", "value"}], "layers": {layer: [e_i per task]}},
#      "leakage":   {"mean", "worst": [{"layer", "task", "from", "value"}], "layers": {layer: mean_{j≠i} ℓ_ij}}}
#
# "worst" lists the DIAGNOSTICS_WORST largest entries (ties in model and task order); means and worst skip the
# entries that are undefined (null: a task whose update has no energy on its inputs).

DIAGNOSTICS_FORMAT = "many.lpm.diagnostics/1"  # = many.lpm_diagnostics.FORMAT (not imported: this module needs no torch)
DIAGNOSTICS_WORST = 5


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def diagnostics_summary(tasks: Sequence[str], diagnostics: Mapping[str, Any]) -> dict[str, Any]:
    """report["diagnostics"] (see above) from a merge_diagnostics diagnostics.json over the first
    diagnostics["tasks"] of `tasks`; ValueError for another format or more tasks than the run has."""
    if not isinstance(diagnostics, Mapping) or diagnostics.get("format") != DIAGNOSTICS_FORMAT:
        raise ValueError(f"report: merge diagnostics are not of format {DIAGNOSTICS_FORMAT!r}; rerun `many run`")
    count = diagnostics["tasks"]
    if not 1 <= count <= len(tasks):
        raise ValueError(f"report: merge diagnostics over {count} tasks, but the run has {len(tasks)}")
    merged = list(tasks[:count])
    groups = {group: list(entry["layers"]) for group, entry in diagnostics["groups"].items()}
    fit = {layer: entry["fit_error"][layer] for entry in diagnostics["groups"].values() for layer in entry["layers"]}
    leak = {layer: entry["leakage"][layer] for entry in diagnostics["groups"].values() for layer in entry["layers"]}
    errors = [(value, layer, i) for layer, row in fit.items() for i, value in enumerate(row) if value is not None]
    leaks = [(value, layer, i, j) for layer, matrix in leak.items() for i, row in enumerate(matrix)
             for j, value in enumerate(row) if j != i and value is not None]
    order = {layer: k for k, layer in enumerate(fit)}

    def off_diagonal(matrix: Sequence[Sequence[float | None]]) -> float | None:
        return _mean([v for i, row in enumerate(matrix) for j, v in enumerate(row) if j != i and v is not None])

    worst_errors = sorted(errors, key=lambda e: (-e[0], order[e[1]], e[2]))[:DIAGNOSTICS_WORST]
    worst_leaks = sorted(leaks, key=lambda e: (-e[0], order[e[1]], e[2], e[3]))[:DIAGNOSTICS_WORST]
    return {
        "after": merged[-1],
        "tasks": merged,
        "groups": groups,
        "fit_error": {
            "mean": _mean([e[0] for e in errors]),
            "worst": [{"layer": layer, "task": merged[i], "value": value} for value, layer, i in worst_errors],
            "layers": fit,
        },
        "leakage": {
            "mean": _mean([e[0] for e in leaks]),
            "worst": [{"layer": layer, "task": merged[i], "from": merged[j], "value": value}
                      for value, layer, i, j in worst_leaks],
            "layers": {layer: off_diagonal(matrix) for layer, matrix in leak.items()},
        },
    }


def short_layer(layer: str) -> str:
    """A figure label for a PEFT module name: "…language_model.layers.3.self_attn.q_proj" → "3.q_proj"."""
    found = re.search(r"layers\.(\d+)\.(?:.*\.)?([^.]+)$", layer)
    return f"{found.group(1)}.{found.group(2)}" if found else layer


def _value_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def diagnostics_lines(report: Mapping) -> list[str]:
    """The terminal lines of report["diagnostics"] (none without it): means and the worst layer of each."""
    summary = report.get("diagnostics")
    if summary is None:
        return []
    fit, leak = summary["fit_error"], summary["leakage"]
    line = f"LPM merge after {summary['after']}: fit error mean {_value_text(fit['mean'])}"
    if fit["worst"]:
        worst = fit["worst"][0]
        line += f", worst {_value_text(worst['value'])} ({short_layer(worst['layer'])} on {worst['task']})"
    line += f"; leakage mean {_value_text(leak['mean'])}"
    if leak["worst"]:
        worst = leak["worst"][0]
        line += f", worst {_value_text(worst['value'])} ({short_layer(worst['layer'])}: {worst['from']} on {worst['task']})"
    return [line]


def _diagnostics_png(report: Mapping) -> bytes:
    """Left: the fit error e_i as a layer × task heatmap (rows: layers in model order, input groups separated by
    lines; columns: tasks merged; sqrt colour scale from 0 to max(1, largest e_i), e_i = 1 being what no update
    scores). Right: each layer's mean leakage over the task pairs i ≠ j."""
    from matplotlib.colors import PowerNorm

    summary = report["diagnostics"]
    tasks, fit = summary["tasks"], summary["fit_error"]["layers"]
    layers = [layer for members in summary["groups"].values() for layer in members]
    values = np.array([[np.nan if v is None else v for v in fit[layer]] for layer in layers], dtype=float)  # (L, T)
    vmax = max(1.0, float(np.nanmax(values)) if np.isfinite(values).any() else 1.0)
    cmap = colormaps["Reds"].with_extremes(bad="lightgrey")
    norm = PowerNorm(0.5, vmin=0.0, vmax=vmax)
    rows, T = len(layers), len(tasks)
    annotate = rows <= 48 and T <= 12
    height = 1.8 + (0.24 if rows <= 48 else 0.1) * rows
    figure = Figure(figsize=(3.2 + 0.8 * T + 2.6, height), layout="constrained")
    heat, bars = figure.subplots(1, 2, sharey=True, width_ratios=[max(T, 2), 3])
    image = heat.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if annotate:
        for r in range(rows):
            for j in range(T):
                value = values[r, j]
                ink = "white" if np.isfinite(value) and norm(value) > 0.6 else "black"
                heat.text(j, r, "–" if not np.isfinite(value) else f"{value:.2g}", ha="center", va="center",
                          color=ink, fontsize=7)
    ends = np.cumsum([len(members) for members in summary["groups"].values()])[:-1]
    for end in ends:
        heat.axhline(end - 0.5, color="black", linewidth=0.6)
        bars.axhline(end - 0.5, color="black", linewidth=0.6)
    heat.set_xticks(range(T), [_plain(task) for task in tasks], rotation=35, ha="right", rotation_mode="anchor")
    heat.set_yticks(range(rows), [_plain(short_layer(layer)) for layer in layers], fontsize=7 if rows > 24 else 9)
    heat.set_xlabel("task i")
    heat.set_title(_plain(f"fit error e_i — mean {_value_text(summary['fit_error']['mean'])}"), fontsize=10)
    figure.colorbar(image, ax=heat, label="e_i (1 = no better than no update)", shrink=0.8, location="left", pad=0.12)
    leak = [summary["leakage"]["layers"][layer] for layer in layers]
    if any(v is not None for v in leak):
        bars.barh(range(rows), [0.0 if v is None else v for v in leak], color="tab:purple")
        bars.set_xlabel("mean leakage ℓ_ij, j ≠ i")
    else:
        bars.text(0.5, 0.5, "one task:\nno leakage", ha="center", va="center", transform=bars.transAxes)
        bars.set_xticks([])
    bars.set_title("mean leakage per layer", fontsize=10)
    bars.tick_params(axis="y", left=False)
    bars.grid(axis="x", alpha=0.3)
    figure.suptitle(_plain(f"LPM merge after {summary['after']}: which layers and tasks it fits"))
    return _png(figure)


def _diagnostics_tables(summary: Mapping) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the worst fit errors and of the worst leakages."""
    fit = [[row["layer"], row["task"], _value_text(row["value"])] for row in summary["fit_error"]["worst"]]
    leak = [[row["layer"], row["task"], row["from"], _value_text(row["value"])] for row in summary["leakage"]["worst"]]
    return ["layer", "task i", "fit error e_i"], fit, ["layer", "task i", "from task j", "leakage ℓ_ij"], leak


DIAGNOSTICS_TEXT = (
    "Per LoRA layer and task i, from the cached factors: fit error e_i = tr((M−ΔW_i) G_i (M−ΔW_i)ᵀ) / "
    "tr(ΔW_i G_i ΔW_iᵀ) (0: the merge M does task i's update exactly on its inputs; 1: no better than no update) and "
    "leakage ℓ_ij = tr(ΔW_j G_i ΔW_jᵀ) / tr(ΔW_i G_i ΔW_iᵀ) (how strongly task j's update acts on task i's inputs)."
)


def _diagnostics_parts(report: Mapping) -> tuple[dict[str, bytes], list[str], list[str]]:
    """What `render` adds for report["diagnostics"]: ({"diagnostics.png": PNG}, markdown lines, HTML lines); all
    empty without it."""
    summary = report.get("diagnostics")
    if summary is None:
        return {}, [], []
    png = _diagnostics_png(report)
    fit_header, fit_rows, leak_header, leak_rows = _diagnostics_tables(summary)
    title = f"LPM merge diagnostics after {summary['after']}"
    markdown = [f"## {_md_cell(title)}\n", DIAGNOSTICS_TEXT + "\n", "![LPM merge diagnostics](diagnostics.png)\n",
                _md_table(fit_header, fit_rows)]
    if leak_rows:
        markdown.append(_md_table(leak_header, leak_rows))

    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"

    page = [f"<h2>{html.escape(title)}</h2>", f"<p>{html.escape(DIAGNOSTICS_TEXT)}</p>",
            _img(png, "LPM fit error per layer and task, mean leakage per layer"), table(fit_header, fit_rows)]
    if leak_rows:
        page.append(table(leak_header, leak_rows))
    return {"diagnostics.png": png}, markdown, page
