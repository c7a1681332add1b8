"""The report (many/report.py): report JSON from matrices and from eval scores, its metrics, the terminal and
markdown tables, shape errors, PNG/HTML rendering."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re

import numpy as np
import pytest

from many.report import (
    IncompleteScores,
    file_stem,
    losses_png,
    markdown_table,
    matrix_markdown,
    render,
    report_from_matrices,
    report_from_scores,
    text_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["shape", "chart", "count"]
# A[t][j]: score on task j after learning tasks 0..t.
SEQLORA = [[90.0, None, None], [20.0, 95.0, None], [10.0, 30.0, 98.0]]
MANY = [[80.0, None, None], [60.0, 90.0, None], [50.0, 70.0, 100.0]]


@pytest.fixture(scope="module")
def report() -> dict:
    # seqlora first: the report must keep the caller's method order, not sort it.
    return report_from_matrices(
        TASKS,
        {"seqlora": SEQLORA, "many": MANY},
        extras={"many": {"tau": 0.01, "trainable_parameters": 1234567}},
    )


def test_metrics_by_hand(report: dict) -> None:
    assert report["tasks"] == TASKS
    assert list(report["methods"]) == ["seqlora", "many"]
    many = report["methods"]["many"]
    assert many["MFT"] == pytest.approx((80 + 90 + 100) / 3)
    assert many["MFN"] == pytest.approx((50 + 70 + 100) / 3)
    assert many["MAA"] == pytest.approx((80 + (60 + 90) / 2 + (50 + 70 + 100) / 3) / 3)
    assert many["BWT"] == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    seqlora = report["methods"]["seqlora"]
    assert seqlora["MFT"] == pytest.approx((90 + 95 + 98) / 3)
    assert seqlora["MFN"] == pytest.approx((10 + 30 + 98) / 3)
    assert seqlora["MAA"] == pytest.approx((90 + (20 + 95) / 2 + (10 + 30 + 98) / 3) / 3)
    assert seqlora["BWT"] == pytest.approx(((10 - 90) + (30 - 95)) / 2)
    assert many["matrix"] == MANY
    assert (many["tau"], many["trainable_parameters"]) == (0.01, 1234567)
    assert set(seqlora) == {"matrix", "MFT", "MFN", "MAA", "BWT"}
    assert json.loads(json.dumps(report)) == report  # plain JSON


def test_report_from_scores_fills_row_t_and_takes_extras_from_the_last_row() -> None:
    def row(t: int, scores: list[float], **fields) -> dict:
        return {"method": "m", "tasks": TASKS[: t + 1], "scores": scores, "tau": None, **fields}

    scores = [  # any order; extras of earlier rows and fields outside SCORE_EXTRAS are not shown
        ("many", 2, row(2, [50, 70.0, 100.0], trainable_parameters=1234567, core_dims=3)),
        ("many", 0, row(0, [80.0], trainable_parameters=1)),
        ("seqlora", 0, row(0, [90.0])),
        ("many", 1, row(1, [60.0, 90.0])),
        ("seqlora", 1, row(1, [20.0, 95.0])),
        ("seqlora", 2, row(2, [10.0, 30.0, 98.0])),
    ]
    report = report_from_scores(tuple(TASKS), ["seqlora", "many"], scores)
    assert report == report_from_matrices(
        TASKS, {"seqlora": SEQLORA, "many": MANY}, extras={"many": {"trainable_parameters": 1234567}}
    )
    assert list(report["methods"]) == ["seqlora", "many"]  # the order of `methods`, not of the scores

    with pytest.raises(IncompleteScores, match=r"report: no eval of many after task\(s\) \['chart'\]$"):
        report_from_scores(TASKS, ["many"], [s for s in scores if s[0] == "many" and s[1] != 1])
    with pytest.raises(IncompleteScores, match=r"eval of many at row 1 scored tasks \['chart'\], expected "
                                               r"\['shape', 'chart'\]"):
        report_from_scores(TASKS, ["many"], [("many", 1, {"tasks": ["chart"], "scores": [1.0]})])


def test_upper_triangle_is_dropped_and_numpy_input_accepted() -> None:
    filled = np.array([[80.0, 1.0, np.nan], [60.0, 90.0, 3.0], [np.float32(50.0), 70.0, 100.0]])
    built = report_from_matrices(TASKS, {"many": filled})["methods"]["many"]
    assert built["matrix"] == MANY
    assert all(type(v) is float for row in built["matrix"] for v in row if v is not None)
    assert built["MFN"] == pytest.approx(220 / 3)


def test_markdown_table(report: dict) -> None:
    lines = markdown_table(report).splitlines()
    assert lines[0] == (
        "| method | shape | chart | count | MFT | MFN (Last) | MAA | BWT | tau | trainable_parameters |"
    )
    assert lines[1] == "|---|" + "---:|" * 9
    # final row of each matrix, then MFT, Last (best in bold), MAA, BWT, extras (blank where absent)
    assert lines[2] == "| seqlora | 10.0 | 30.0 | 98.0 | 94.3 | 46.0 | 64.5 | -72.5 |  |  |"
    assert lines[3] == "| many | 50.0 | 70.0 | 100.0 | 90.0 | **73.3** | 76.1 | -25.0 | 0.01 | 1,234,567 |"
    assert len(lines) == 4


def test_text_table(report: dict) -> None:
    assert text_table(report).splitlines() == [
        "method       MFT     MFN     MAA     BWT  trainable_parameters   last row (shape, chart, count)",
        "-" * 95,
        "seqlora     94.3    46.0    64.5   -72.5                     –   10.0 30.0 98.0",
        "many        90.0    73.3    76.1   -25.0             1,234,567   50.0 70.0 100.0",
        "",
        "A[t][j]     score on task j after learning tasks 0..t (rows: after learning; columns: evaluated on)",
        "MFT         mean of the diagonal A[t][t]: each task's score right after learning it (plasticity)",
        "MFN (Last)  mean of the last row A[T−1][j]: every task's score after learning the whole stream",
        "MAA         mean over t of the mean of A[t][j≤t]: the average over the tasks learned so far, along the stream",
        "BWT         mean over j<T−1 of A[T−1][j] − A[j][j]: change since each task was learned; negative = forgetting",
        (
            "scores      exact match in % for QA tasks; caption tasks: 100 × mean of BLEU-1..4, METEOR, ROUGE-L, "
            "CIDEr (CIDEr is 0–10, so it can exceed 100)"
        ),
    ]
    # BWT signed; unlike the markdown (test_markdown_ties_bold_…), a BWT just below zero prints as "-0.0" here
    tiny_forgetting = report_from_matrices(["a", "b"], {"w": [[50.0, None], [49.96, 50.0]]})
    assert text_table(tiny_forgetting).splitlines()[2] == "w           50.0    50.0    50.0    -0.0   50.0 50.0"
    # task_metrics known: caption tasks marked in the last-row header, the score line says which they are
    captioned = report_from_matrices(["a", "cap"], {"w": [[50.0, None], [49.0, 150.0]]},
                                     task_metrics=["exact_match", "caption"])
    lines = text_table(captioned).splitlines()
    assert lines[0].endswith("last row (a, cap †)") and lines[2].endswith("49.0 150.0")
    assert lines[-1].startswith("scores      exact match in %; † caption tasks: 100 × mean of BLEU-1..4")


def test_markdown_ties_bold_every_best_and_escapes_pipes() -> None:
    tied = report_from_matrices(["a|b"], {"x|y": [[55.0]], "z": [[55.0]], "w": [[-0.04]]})
    table = markdown_table(tied)
    assert "| method | a\\|b | MFT |" in table
    assert "| x\\|y | 55.0 | 55.0 | **55.0** | 55.0 | 0.0 |" in table
    assert "| z | 55.0 | 55.0 | **55.0** | 55.0 | 0.0 |" in table
    assert table.count("**") == 4  # both tied methods bold, nothing else
    assert "| w | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 |" in table  # no "-0.0"


def test_matrix_markdown(report: dict) -> None:
    assert matrix_markdown(report, "many").splitlines() == [
        "|  | shape | chart | count |",
        "|---|---:|---:|---:|",
        "| after shape | 80.0 |  |  |",
        "| after chart | 60.0 | 90.0 |  |",
        "| after count | 50.0 | 70.0 | 100.0 |",
    ]
    with pytest.raises(ValueError, match="unknown method 'ties'; known: seqlora, many"):
        matrix_markdown(report, "ties")


BAD_REPORTS = [
    ("too few rows", TASKS, {"good": MANY, "short": MANY[:2]}, None,
     "method 'short': accuracy matrix has 2 rows for 3 tasks"),
    ("ragged row", TASKS, {"ragged": [[1.0, None, None], [2.0, 3.0], [4.0, 5.0, 6.0]]}, None,
     "method 'ragged': accuracy matrix row 1 (after 'chart') has 2 entries, expected 3"),
    ("missing lower entry", TASKS, {"holey": [[1.0, None, None], [None, 3.0, None], [4.0, 5.0, 6.0]]}, None,
     "method 'holey': A[1][0] (on 'shape' after 'chart') is None"),
    ("NaN diagonal", TASKS, {"nan": [[1.0, None, None], [2.0, 3.0, None], [4.0, 5.0, float("nan")]]}, None,
     "method 'nan': A[2][2] (on 'count' after 'count') is nan"),
    ("string score", TASKS, {"text": [["80", None, None], [2.0, 3.0, None], [4.0, 5.0, 6.0]]}, None,
     "method 'text': A[0][0] (on 'shape' after 'shape') is '80'"),
    ("boolean score", TASKS, {"flag": [[True, None, None], [2.0, 3.0, None], [4.0, 5.0, 6.0]]}, None,
     "method 'flag': A[0][0] (on 'shape' after 'shape') is True"),
    ("no tasks", [], {"m": []}, None, "report: no tasks"),
    ("duplicate tasks", ["a", "a"], {"m": [[1.0, None], [1.0, 1.0]]}, None, "duplicate task names ['a']"),
    ("empty task name", ["a", ""], {"m": [[1.0, None], [1.0, 1.0]]}, None, "task 1 has name ''"),
    ("no methods", TASKS, {}, None, "report: no methods"),
    ("empty method name", TASKS, {"": MANY}, None, "method name ''"),
    ("extras of unknown method", TASKS, {"many": MANY}, {"cram": {"tau": 1.0}},
     "extras for unknown methods ['cram']; known: many"),
    ("extra overrides a metric", TASKS, {"many": MANY}, {"many": {"MFN": 1.0}},
     "method 'many': extra field 'MFN' is not allowed"),
    ("non-scalar extra", TASKS, {"many": MANY}, {"many": {"ranks": [8, 8]}},
     "method 'many': extra field 'ranks' is [8, 8]; extras must be finite numbers"),
    ("infinite extra", TASKS, {"many": MANY}, {"many": {"tau": float("inf")}},
     "method 'many': extra field 'tau' is inf"),
]


@pytest.mark.parametrize(
    ("tasks", "matrices", "extras", "fragment"),
    [case[1:] for case in BAD_REPORTS],
    ids=[case[0] for case in BAD_REPORTS],
)
def test_bad_reports(tasks, matrices, extras, fragment) -> None:
    with pytest.raises(ValueError) as error:
        report_from_matrices(tasks, matrices, extras)
    assert fragment in str(error.value)


def test_file_stem() -> None:
    assert file_stem("task_arithmetic") == "task_arithmetic"
    assert file_stem("many-v1.2") == "many-v1.2"
    odd = 'a<b>/../"c d"'
    assert file_stem(odd) == "a_b__..__c_d_-" + hashlib.sha256(odd.encode()).hexdigest()[:8]  # no "/" left
    assert file_stem("a b") != file_stem("a/b")  # both clean to "a_b"; the hash keeps them apart
    assert file_stem("a b") != "a_b"
    assert not file_stem(".hidden").startswith(".")


def test_render_writes_png_markdown_html_json(report: dict, tmp_path) -> None:
    odd = 'MAny <τ="0.01"> & co/x'
    tasks = ["shape", "chart $x^$", "count"]  # unescaped, "$x^$" would be parsed as mathtext and fail
    odd_report = report_from_matrices(tasks, {"seqlora": SEQLORA, odd: MANY}, extras={odd: {"tau": 0.01}})
    written = render(odd_report, tmp_path / "out")
    pngs = ["heatmap_seqlora.png", f"heatmap_{file_stem(odd)}.png", "forgetting.png"]
    assert sorted(written) == sorted([*pngs, "report.md", "report.html", "report.json"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)
    for name in pngs:
        assert written[name].read_bytes().startswith(PNG_MAGIC)
        assert written[name].stat().st_size > 5000  # a real figure, not an empty canvas
    assert re.fullmatch(r"heatmap_MAny__.*_co_x-[0-9a-f]{8}\.png", pngs[1]), pngs[1]

    assert json.loads(written["report.json"].read_text()) == odd_report

    markdown = written["report.md"].read_text()
    assert markdown_table(odd_report) in markdown
    assert matrix_markdown(odd_report, odd) in markdown
    assert f"]({pngs[1]})" in markdown

    page = written["report.html"].read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(uri) for uri in uris) == sorted(written[name].read_bytes() for name in pngs)
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "<td>MAny &lt;τ=&quot;0.01&quot;&gt; &amp; co/x</td>" in page
    assert "<τ=" not in page  # the raw name never reaches the markup
    assert "<td><strong>73.3</strong></td>" in page  # best Last
    assert "<th>MFN (Last)</th>" in page and "<td>-72.5</td>" in page


def test_render_refuses_names_that_collide_on_case_insensitive_disks(tmp_path) -> None:
    clash = report_from_matrices(["a"], {"MAny": [[1.0]], "many": [[2.0]]})
    with pytest.raises(ValueError, match="methods 'MAny' and 'many' map to the same file name heatmap_many.png"):
        render(clash, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


# -- #15: the legend, caption tasks, one colour scale, the stage timeline ------------------------------------

CAPTION_TASKS = ["shape", "noisy-caption", "count"]
CAPTION_METRICS = ["exact_match", "caption", "exact_match"]
WIDE = [[80.0, None, None], [60.0, 176.0, None], [50.0, 140.0, 100.0]]  # caption scores above 100


def definitions() -> dict[str, str]:
    """A fragment of each metric's one-line definition (docs/design.md §1.3)."""
    return {
        "MFT": "mean of the diagonal A[t][t]",
        "MFN": "mean of the last row A[T−1][j]",
        "MAA": "mean over t of the mean of A[t][j≤t]",
        "BWT": "mean over j<T−1 of A[T−1][j] − A[j][j]",
    }


def test_every_table_and_page_explains_the_metrics(report: dict, tmp_path) -> None:
    from many.report import markdown_legend

    written = render(report, tmp_path / "out")
    markdown, page, table = written["report.md"].read_text(), written["report.html"].read_text(), text_table(report)
    for metric, definition in definitions().items():
        assert re.search(rf"^{re.escape(metric)}( \(Last\))? +{re.escape(definition)}", table, re.MULTILINE), metric
        assert re.search(rf"^- \*\*{re.escape(metric)}( \(Last\))?\*\*: {re.escape(definition)}", markdown, re.MULTILINE)
        assert re.search(rf"<dt>{re.escape(metric)}( \(Last\))?</dt><dd>{re.escape(html.escape(definition))}", page)
    assert markdown_legend(report) in markdown
    assert "score on task j after learning tasks 0..t" in table and "score on task j after learning tasks 0..t" in page
    assert json.loads(written["report.json"].read_text()) == report  # the JSON keeps its keys: no legend in it
    assert set(report) == {"tasks", "methods"}


def test_task_metrics_mark_caption_tasks_everywhere(tmp_path) -> None:
    captioned = report_from_matrices(CAPTION_TASKS, {"many": WIDE}, task_metrics=CAPTION_METRICS)
    assert list(captioned) == ["tasks", "task_metrics", "methods"] and captioned["task_metrics"] == CAPTION_METRICS
    scores = [("many", t, {"tasks": CAPTION_TASKS[: t + 1], "scores": row[: t + 1]}) for t, row in enumerate(WIDE)]
    assert report_from_scores(CAPTION_TASKS, ["many"], scores, CAPTION_METRICS) == captioned
    assert markdown_table(captioned).splitlines()[0].startswith("| method | shape | noisy-caption † | count | MFT |")
    assert matrix_markdown(captioned, "many").splitlines()[0] == "|  | shape | noisy-caption † | count |"
    written = render(captioned, tmp_path / "out")
    assert json.loads(written["report.json"].read_text()) == captioned
    page = written["report.html"].read_text()
    assert "<th>noisy-caption †</th>" in page
    assert "<dt>scores</dt><dd>exact match in %; † caption tasks: 100 × mean of BLEU-1..4" in page
    assert "- **scores**: exact match in %; † caption tasks: 100 × mean" in written["report.md"].read_text()

    plain = report_from_matrices(TASKS, {"many": MANY}, task_metrics=["exact_match"] * 3)
    assert "†" not in markdown_table(plain) and "exact match in % (every task)" in text_table(plain)
    with pytest.raises(ValueError, match="report: 2 task metrics for 3 tasks"):
        report_from_matrices(TASKS, {"many": MANY}, task_metrics=["caption", "caption"])
    with pytest.raises(ValueError, match="report: task 'chart' has metric 'bleu'; known: exact_match, caption"):
        report_from_matrices(TASKS, {"many": MANY}, task_metrics=["caption", "bleu", "caption"])


def test_heatmaps_share_one_colour_scale_and_label_caption_scores(tmp_path, monkeypatch) -> None:
    import many.report as module

    # own maxima 100, 176 and 98: one scale 0…176 for all three
    report = report_from_matrices(CAPTION_TASKS, {"many": MANY, "wide": WIDE, "seqlora": SEQLORA},
                                  task_metrics=CAPTION_METRICS)
    assert module.score_scale(report) == (0.0, 176.0)
    assert module.score_scale(report_from_matrices(TASKS, {"low": [[1.0, None, None], [2.0, 3.0, None],
                                                                    [4.0, 5.0, 6.0]]})) == (0.0, 100.0)
    figures = {}
    draw = module._heatmap_figure

    def recorded(report, method, scale):
        figures[method] = draw(report, method, scale)
        return figures[method]

    monkeypatch.setattr(module, "_heatmap_figure", recorded)
    render(report, tmp_path / "out")
    assert set(figures) == {"many", "wide", "seqlora"}
    for method, figure in figures.items():
        heatmap, colorbar = figure.axes
        assert heatmap.images[0].get_clim() == (0.0, 176.0), method
        assert colorbar.get_ylabel() == "score (% for exact match; caption score ×100 for † tasks)"
        assert [tick.get_text() for tick in heatmap.get_xticklabels()] == ["shape", "noisy-caption †", "count"]
    # one score, one colour: 100 maps to the same point of the colour map on every method's heatmap
    assert figures["many"].axes[0].images[0].norm(100.0) == figures["wide"].axes[0].images[0].norm(100.0)

    forgetting = module._forgetting_figure(report)
    labels = [ax.get_ylabel() for ax in forgetting.axes if ax.get_visible()]
    assert labels == ["exact match (%)", "caption score (×100)", "exact match (%)"]
    assert [ax.get_title() for ax in forgetting.axes if ax.get_visible()][1] == "2. noisy-caption †"
    unknown = module._heatmap_figure(report_from_matrices(TASKS, {"many": MANY}), "many", (0.0, 100.0))
    assert unknown.axes[1].get_ylabel() == "score (% for exact match; caption score ×100 for caption tasks)"


T0 = 1_700_000_000.0
SPANS = [  # (stage, task, method, host, start, end[, cached])
    ("base", None, None, "node-a", T0, T0 + 100.0),
    ("finetune", "shape", None, "node-a", T0 + 100.0, T0 + 300.0),
    ("finetune", "chart", None, "node-a", T0 + 110.0, T0 + 250.0),  # overlaps the first: a second lane
    ("finetune", "count", None, "node-b", T0 + 100.0, T0 + 280.0),
    ("eval", "chart", "many", "node-a", T0 + 300.0, T0 + 330.0, True),  # after both: back in lane 0
]


def test_timeline_one_bar_per_stage_lanes_per_host_coloured_by_kind() -> None:
    import many.report as module

    figure = module._timeline_figure(SPANS)
    ax = figure.axes[0]
    bars = ax.patches
    assert len(bars) == len(SPANS)
    # x = seconds since the first start (total 330 s → minutes), width = the stage's duration
    assert sorted((round(b.get_x() * 60, 6), round(b.get_width() * 60, 6)) for b in bars) == sorted(
        (s[4] - T0, s[5] - s[4]) for s in SPANS)
    rows = {round(b.get_x() * 60): b.get_y() + b.get_height() / 2 for b in bars if b.get_x() * 60 != 100.0}
    centres = sorted({b.get_y() + b.get_height() / 2 for b in bars})
    assert centres == [0.0, 1.0, 2.0]  # node-a: two lanes (two concurrent finetunes), node-b: one
    assert rows[0] == rows[300] == 0.0 and rows[110] == 1.0  # the eval reuses lane 0 once the first finetune ends
    assert [t.get_text() for t in ax.get_yticklabels()] == ["node-a", "node-b"]
    finetunes = [b for b in bars if round(b.get_width() * 60) in (200, 140, 180)]
    assert len({b.get_facecolor()[:3] for b in finetunes}) == 1  # one colour per stage kind
    assert len({b.get_facecolor()[:3] for b in bars}) == 3
    cached = [b for b in bars if round(b.get_x() * 60) == 300]
    assert cached[0].get_alpha() == 0.4 and all(b.get_alpha() == 1.0 for b in bars if b not in cached)
    assert ax.get_xlabel() == "min since the first stage started (2023-11-14 22:13:20 UTC)"
    assert ax.get_title() == "Stage timeline — 5 stages, wall 5.5 min, stage time 10.8 min"
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["base ×1, 100.0 s", "finetune ×3, 8.7 min", "eval ×1, 30.0 s"]

    with pytest.raises(ValueError, match="timeline: stage 'eval' ends"):
        module._timeline_figure([("eval", "a", "m", "h", T0 + 5, T0)])
    with pytest.raises(ValueError, match="timeline: stage 'eval' has start nan"):
        module._timeline_figure([("eval", "a", "m", "h", float("nan"), T0)])


def test_render_writes_the_timeline_into_png_markdown_and_html(report: dict, tmp_path) -> None:
    from many.report import TIMELINE_CAPTION, StageSpan

    written = render(report, tmp_path / "out", timeline=[StageSpan(*span) for span in SPANS])
    assert set(written) == {"heatmap_seqlora.png", "heatmap_many.png", "forgetting.png", "timeline.png",
                            "report.md", "report.html", "report.json"}
    png = written["timeline.png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    page = written["report.html"].read_text()
    assert f'<img alt="stage timeline" src="data:image/png;base64,{base64.b64encode(png).decode()}">' in page
    assert "Stages this run found cached are drawn faded at the time they were computed" in page
    assert "![stage timeline](timeline.png)" in written["report.md"].read_text()
    assert TIMELINE_CAPTION in written["report.md"].read_text()
    assert json.loads(written["report.json"].read_text()) == report  # the timeline is not part of the report
    assert "timeline.png" not in render(report, tmp_path / "empty", timeline=[])


LOSSES = [
    {"stage": "base", "task": None, "method": None, "step": list(range(1, 101)), "loss": [5.0 * 0.95**s for s in range(100)]},
    {"stage": "finetune", "task": "shape", "method": None, "step": [1, 2, 3], "loss": [2.0, 1.5, 1.2]},
    {"stage": "finetune", "task": "chart $x^$", "method": None, "step": [1, 2, 3], "loss": [2.2, 1.9, 1.4]},
    {"stage": "seqlora", "task": "chart $x^$", "method": "seqlora", "step": [1, 2, 3], "loss": [1.9, 1.6, 1.3]},
    {"stage": "finetune", "task": "count", "method": None, "step": [], "loss": []},  # no steps: left out
]


def test_render_adds_the_training_loss_figure(report: dict, tmp_path) -> None:  # noqa: ANN001
    written = render(report, tmp_path / "out", losses=LOSSES)
    figure = written["losses.png"].read_bytes()
    assert figure.startswith(PNG_MAGIC) and len(figure) > 5000
    assert figure == losses_png(LOSSES)  # deterministic
    assert "![training loss](losses.png)" in written["report.md"].read_text()
    page = written["report.html"].read_text()
    assert "<h2>Training loss</h2>" in page and base64.b64encode(figure).decode() in page
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)

    untrained = render(report, tmp_path / "untrained", losses=LOSSES[-1:])  # e.g. an HF base only: nothing to plot
    assert "losses.png" not in untrained and "Training loss" not in untrained["report.html"].read_text()
    with pytest.raises(ValueError, match="no loss curve has any step"):
        losses_png(LOSSES[-1:])
