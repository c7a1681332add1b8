"""The LPM merge diagnostics in the report (many/report.py): the summary of a diagnostics.json (means, worst layers
and tasks, per-layer values in model order), its terminal line, and the heatmap, markdown and HTML `render` adds."""

from __future__ import annotations

import json

import pytest

from many.lpm_diagnostics import FORMAT
from many.report import (
    DIAGNOSTICS_FORMAT,
    diagnostics_lines,
    diagnostics_summary,
    render,
    report_from_matrices,
    short_layer,
    text_table,
)

TASKS = ["shape", "chart", "count"]
PREFIX = "base_model.model.model.language_model.layers"
Q, K, O = (f"{PREFIX}.0.self_attn.{name}" for name in ("q_proj", "k_proj", "o_proj"))
DOWN = f"{PREFIX}.1.mlp.down_proj"


def diagnostics(tasks: int = 2) -> dict:
    """diagnostics.json over the first `tasks` tasks: groups q/k, o, down in model order."""
    def group(layers, errors, leakage):
        return {"layers": layers, "fit_error": dict(zip(layers, errors)), "leakage": dict(zip(layers, leakage)),
                "energy": {layer: [1.0] * tasks for layer in layers}}

    if tasks == 1:
        return {"format": FORMAT, "tasks": 1, "groups": {Q: group([Q, K], [[0.0], [0.5]], [[[1.0]], [[1.0]]])}}
    return {"format": FORMAT, "tasks": 2, "groups": {
        Q: group([Q, K], [[0.1, 0.2], [0.05, 0.9]], [[[1.0, 0.3], [0.1, 1.0]], [[1.0, 2.0], [0.5, 1.0]]]),
        O: group([O], [[0.3, None]], [[[1.0, 0.0], [None, None]]]),
        DOWN: group([DOWN], [[1.5, 0.01]], [[[1.0, 4.0], [0.2, 1.0]]]),
    }}


def test_the_format_names_agree() -> None:
    assert DIAGNOSTICS_FORMAT == FORMAT


def test_summary_means_worst_and_layers_in_model_order() -> None:
    summary = diagnostics_summary(TASKS, diagnostics())
    assert summary["after"] == "chart" and summary["tasks"] == ["shape", "chart"]
    assert summary["groups"] == {Q: [Q, K], O: [O], DOWN: [DOWN]}
    fit = summary["fit_error"]
    assert list(fit["layers"]) == [Q, K, O, DOWN] and fit["layers"][O] == [0.3, None]
    assert fit["mean"] == pytest.approx((0.1 + 0.2 + 0.05 + 0.9 + 0.3 + 1.5 + 0.01) / 7)  # null skipped
    assert fit["worst"] == [{"layer": DOWN, "task": "shape", "value": 1.5}, {"layer": K, "task": "chart", "value": 0.9},
                            {"layer": O, "task": "shape", "value": 0.3}, {"layer": Q, "task": "chart", "value": 0.2},
                            {"layer": Q, "task": "shape", "value": 0.1}]
    leak = summary["leakage"]
    assert leak["layers"] == {Q: pytest.approx(0.2), K: pytest.approx(1.25), O: 0.0, DOWN: pytest.approx(2.1)}
    assert leak["mean"] == pytest.approx((0.3 + 0.1 + 2.0 + 0.5 + 0.0 + 4.0 + 0.2) / 7)
    assert leak["worst"][:2] == [{"layer": DOWN, "task": "shape", "from": "chart", "value": 4.0},
                                 {"layer": K, "task": "shape", "from": "chart", "value": 2.0}]
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_one_task_has_no_leakage() -> None:
    summary = diagnostics_summary(TASKS, diagnostics(1))
    assert summary["after"] == "shape" and summary["fit_error"]["mean"] == pytest.approx(0.25)
    assert summary["leakage"] == {"mean": None, "worst": [], "layers": {Q: None, K: None}}


@pytest.mark.parametrize("stored, message", [
    ({"format": "other", "tasks": 1, "groups": {}}, "not of format 'many.lpm.diagnostics/1'"),
    ({"format": FORMAT, "tasks": 4, "groups": {}}, "over 4 tasks, but the run has 3"),
])
def test_bad_diagnostics_are_errors(stored, message) -> None:
    with pytest.raises(ValueError, match=message):
        diagnostics_summary(TASKS, stored)


def test_short_layer_names() -> None:
    assert short_layer(Q) == "0.q_proj" and short_layer(DOWN) == "1.down_proj" and short_layer("lm_head") == "lm_head"


def test_terminal_line_and_rendered_heatmap(tmp_path) -> None:
    matrix = [[80.0, None, None], [60.0, 90.0, None], [50.0, 70.0, 100.0]]
    plain = report_from_matrices(TASKS, {"many": matrix})
    report = {**plain, "diagnostics": diagnostics_summary(TASKS, diagnostics())}
    assert diagnostics_lines(plain) == [] and text_table(plain) in text_table(report)
    assert diagnostics_lines(report) == [(
        "LPM merge after chart: fit error mean 0.437, worst 1.5 (1.down_proj on shape); "
        "leakage mean 1.01, worst 4 (1.down_proj: chart on shape)")]
    assert text_table(report).endswith(diagnostics_lines(report)[0])

    written = render(report, tmp_path / "out")
    assert written["diagnostics.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(written["report.json"].read_text()) == report
    page = written["report.html"].read_text()
    assert "LPM merge diagnostics after chart" in page and page.count("data:image/png;base64,") == 3
    markdown = written["report.md"].read_text()
    assert "![LPM merge diagnostics](diagnostics.png)" in markdown and f"| {DOWN} | shape | 1.5 |" in markdown
    assert "diagnostics.png" not in render(plain, tmp_path / "plain")
    one = {**plain, "diagnostics": diagnostics_summary(TASKS, diagnostics(1))}
    assert render(one, tmp_path / "one")["diagnostics.png"].stat().st_size > 0
