"""Fast tests of the pipeline report: the accuracy matrix from the eval score blobs in the store (flows/report.py),
the tasks' metrics from the data stages, the stage timeline from the manifests, UCIT metrics, tables and the
rendered files (many.report.render) that `many report --out` writes and the flow publishes as Prefect artifacts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.report import build_report, report_from_run, stage_span, task_metrics, timeline_from_run
from many.report import StageSpan, markdown_table, render, report_from_matrices, text_table
from tasks.dispatch import StageRecord
from tasks.store import Manifest, Store, StoreError


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


# -- #15: task metrics from the data stages, the stage timeline from the manifests -------------------------

def data_record(store: Store, tmp_path: Path, task: str, metric: str) -> StageRecord:
    """A data stage's record: its output "task" is a task directory whose task.json names the metric."""
    directory = tmp_path / "tasks" / task
    directory.mkdir(parents=True)
    (directory / "task.json").write_text(json.dumps({"name": task, "metric": metric}, sort_keys=True))
    (directory / "test.parquet").write_bytes(b"not read by the report")
    return StageRecord("data", task, None, "1" * 64, "computed", 0.1, "host", {"task": store.put(directory)})


def test_task_metrics_come_from_the_data_stages(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    tasks = ["a", "cap"]
    rows = [[80.0], [70.0, 150.0]]
    evals = [("many", t, eval_record(store, "many", tasks[: t + 1], row)) for t, row in enumerate(rows)]
    data = [data_record(store, tmp_path, "a", "exact_match"), data_record(store, tmp_path, "cap", "caption")]
    assert task_metrics(store, data) == ["exact_match", "caption"]
    report = build_report(store, tasks, ["many"], evals, data=data)
    assert report == {**build_report(store, tasks, ["many"], evals), "task_metrics": ["exact_match", "caption"]}
    assert "| method | a | cap † |" in markdown_table(report)


def write_manifest(store: Store, stage: str, key: str, outputs: dict, seconds: float, host: str, created: str) -> None:
    store.write_manifest(Manifest(stage=stage, key=key, inputs={}, outputs=outputs, config={}, code_version="1",
                                  seconds=seconds, host=host, created=created))


def stored_run(store: Store, tmp_path: Path) -> dict:
    """A two-task, one-method run in the store: data and eval manifests, the latest run summary."""
    tasks, stages = ["a", "cap"], []
    for t, (task, metric) in enumerate([("a", "exact_match"), ("cap", "caption")]):
        key = f"{t + 1}" * 64
        record = data_record(store, tmp_path, task, metric)
        write_manifest(store, "data", key, record.outputs, 2.0, "node-a", f"2024-05-01T10:00:0{2 + t}+00:00")
        stages.append({"stage": "data", "task": task, "method": None, "key": key, "status": "cached"})
    for t, scores in enumerate([[80.0], [70.0, 150.0]]):
        key = f"{t + 7}" * 64
        ref = eval_record(store, "many", tasks[: t + 1], scores).outputs
        write_manifest(store, "eval", key, ref, 30.0, f"node-{'ab'[t]}", f"2024-05-01T10:01:0{t}+00:00")
        stages.append({"stage": "eval", "task": tasks[t], "method": "many", "key": key, "status": "computed"})
    summary = {"run_id": "r1", "tasks": tasks, "methods": ["many"], "store": store.url, "ray_started": True,
               "stages": stages}
    store.write_run("latest", summary)
    return summary


def test_report_and_timeline_from_a_stored_run(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    store = Store.open(str(tmp_path / "store"))
    summary = stored_run(store, tmp_path)
    report = report_from_run(store, summary)
    assert report["task_metrics"] == ["exact_match", "caption"] and report["methods"]["many"]["MFN"] == 110.0

    spans = timeline_from_run(store, summary)
    t0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC).timestamp()
    assert spans == [  # end = the manifest's `created`, start = end − its seconds; host from the manifest
        StageSpan("data", "a", None, "node-a", t0 + 0.0, t0 + 2.0, True),
        StageSpan("data", "cap", None, "node-a", t0 + 1.0, t0 + 3.0, True),
        StageSpan("eval", "a", "many", "node-a", t0 + 30.0, t0 + 60.0, False),
        StageSpan("eval", "cap", "many", "node-b", t0 + 31.0, t0 + 61.0, False),
    ]
    assert stage_span(store.read_manifest("eval", "8" * 64), "cap", "many").cached is False

    assert main(["report", "--store", store.url, "--json", "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out) == report
    out = tmp_path / "out"
    assert (out / "timeline.png").read_bytes().startswith(b"\x89PNG")
    assert "stage timeline" in (out / "report.html").read_text()

    (tmp_path / "store" / "stages" / "data" / f"{'2' * 64}.json").unlink()  # a data manifest gone: an error, as an eval's
    with pytest.raises(StoreError, match=r"data stage 222222222222 on cap is no longer in the store"):
        report_from_run(store, summary)
    assert [s.task for s in timeline_from_run(store, summary)] == ["a", "a", "cap"]  # the timeline skips it


def test_pipeline_artifacts_include_the_timeline(monkeypatch) -> None:
    import prefect.artifacts

    from flows.pipeline import _publish_artifacts

    images, texts = {}, []
    monkeypatch.setattr(prefect.artifacts, "create_image_artifact",
                        lambda image_url, key, description: images.setdefault(key, image_url))
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact",
                        lambda markdown, key, description: texts.append(markdown))
    report = report_from_matrices(["a", "cap"], {"many": [[80.0, None], [70.0, 150.0]]},
                                  task_metrics=["exact_match", "caption"])
    spans = [("data", "a", None, "h", 0.0, 2.0), ("eval", "a", "many", "h", 2.0, 9.0)]
    _publish_artifacts(report, spans)
    assert set(images) == {"report-heatmap-many", "report-forgetting", "report-timeline"}
    assert all(url.startswith("data:image/png;base64,") for url in images.values())
    assert "- **MFT**: mean of the diagonal A[t][t]" in texts[0] and "| method | a | cap † |" in texts[0]
