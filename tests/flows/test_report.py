"""Fast tests of the pipeline report: the accuracy matrix from the eval score blobs in the store (flows/report.py),
UCIT metrics, tables and the rendered files (many.report.render) that `many report --out` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.report import build_report
from many.report import markdown_table, render, text_table
from tasks.dispatch import StageRecord
from tasks.store import Store, StoreError


def eval_record(store: Store, method: str, tasks: list[str], scores: list[float]) -> StageRecord:
    ref = store.put_bytes(json.dumps({"method": method, "tasks": tasks, "scores": scores, "tau": None}).encode())
    return StageRecord("eval", tasks[-1], method, "0" * 64, "computed", 0.1, "host", {"scores": ref})


def test_matrix_and_metrics_from_eval_rows(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    tasks = ["a", "b", "c"]
    rows = {"many": [[80.0], [70.0, 90.0], [60.0, 85.0, 100.0]], "seqlora": [[80.0], [10.0, 95.0], [0.0, 5.0, 99.0]]}
    evals = [(m, t, eval_record(store, m, tasks[: t + 1], row)) for m, matrix in rows.items() for t, row in enumerate(matrix)]
    report = build_report(store, tasks, list(rows), evals)
    assert set(report) == {"tasks", "methods"} and report["tasks"] == tasks
    many = report["methods"]["many"]
    assert set(many) == {"matrix", "MFT", "MFN", "MAA", "BWT"}
    assert many["matrix"] == [[80.0, None, None], [70.0, 90.0, None], [60.0, 85.0, 100.0]]
    assert many["MFT"] == pytest.approx(90.0) and many["MFN"] == pytest.approx(245.0 / 3)
    assert many["MAA"] == pytest.approx((80.0 + 80.0 + 245.0 / 3) / 3)
    assert many["BWT"] == pytest.approx(((60.0 - 80.0) + (85.0 - 90.0)) / 2)
    assert report["methods"]["seqlora"]["BWT"] == pytest.approx(((0.0 - 80.0) + (5.0 - 95.0)) / 2)
    table = text_table(report)
    assert "many" in table and "-12.5" in table and "-85.0" in table
    assert "| many | 60.0 | 85.0 | 100.0 | 90.0 | **81.7** | 80.6 | -12.5 |" in markdown_table(report)

    written = render(report, tmp_path / "out")
    assert json.loads(written["report.json"].read_text()) == report
    assert {"report.md", "report.html", "forgetting.png", "heatmap_many.png", "heatmap_seqlora.png"} <= set(written)
    assert all(p.stat().st_size > 0 for p in written.values())
    assert written["forgetting.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in written["report.html"].read_text()


def test_a_missing_or_wrong_row_is_an_error(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="no eval of many after task\\(s\\) \\['b'\\] in store .*; rerun `many run`"):
        build_report(store, ["a", "b"], ["many"], [("many", 0, eval_record(store, "many", ["a"], [50.0]))])
    with pytest.raises(StoreError, match="expected \\['a', 'b'\\]"):
        build_report(store, ["a", "b"], ["many"], [("many", 1, eval_record(store, "many", ["b"], [50.0]))])
