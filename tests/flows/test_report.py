"""Fast tests of the report: the accuracy matrix from eval score blobs, UCIT metrics, tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.report import build_report, markdown_table, text_table, write_report
from tasks.stages import StageRecord
from tasks.store import Store, StoreError


def eval_record(store: Store, method: str, tasks: list[str], scores: list[float]) -> StageRecord:
    ref = store.put_bytes(json.dumps({"method": method, "tasks": tasks, "scores": scores, "tau": None}).encode())
    return StageRecord("eval", tasks[-1], method, "0" * 64, "computed", 0.1, "host", {"scores": ref})


def test_matrix_and_metrics_from_eval_rows(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    tasks = ["a", "b"]
    evals = [
        ("many", 0, eval_record(store, "many", ["a"], [80.0])),
        ("many", 1, eval_record(store, "many", ["a", "b"], [60.0, 90.0])),
    ]
    report = build_report(store, tasks, ["many"], evals)
    row = report["methods"]["many"]
    assert report["tasks"] == tasks
    assert row["matrix"] == [[80.0, None], [60.0, 90.0]]
    assert row["MFT"] == pytest.approx(85.0) and row["MFN"] == pytest.approx(75.0)
    assert row["MAA"] == pytest.approx((80.0 + 75.0) / 2) and row["BWT"] == pytest.approx(-20.0)
    assert "many" in text_table(report) and "| many | 85.0 | 75.0 | 77.5 | -20.0 |" in markdown_table(report)
    written = write_report(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert all(p.stat().st_size > 0 for p in written)


def test_incomplete_rows_give_no_metrics_and_a_wrong_row_is_an_error(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    report = build_report(store, ["a", "b"], ["many"], [("many", 0, eval_record(store, "many", ["a"], [50.0]))])
    assert report["methods"]["many"]["MFN"] is None
    with pytest.raises(StoreError, match="expected \\['a', 'b'\\]"):
        build_report(store, ["a", "b"], ["many"], [("many", 1, eval_record(store, "many", ["b"], [50.0]))])
