"""The merge diagnostics in the pipeline report (flows/report.py): the run's last merge_diagnostics link is read from
the store beside the evals, by the flow (a record) and by `many report` (the run summary's stage entries), and both
give the same report; a run without the stage has no "diagnostics" key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.report import build_report, last_diagnostics, report_from_run
from many.lpm_diagnostics import FORMAT
from tasks.rows.many import DIAGNOSTICS_CHAIN
from tasks.store import Manifest, Store, StoreError

TASKS = ["a", "b"]
LAYER = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


def stage(store: Store, name: str, task: str, method: str, output: str, value: dict, key: str) -> tuple[Manifest, dict]:
    """A manifest of stage `name` whose one JSON output is `value`, and its entry in a run summary."""
    ref = store.put_bytes(json.dumps(value).encode())
    manifest = store.write_manifest(Manifest(stage=name, key=key, inputs={}, outputs={output: ref}, config={},
                                             code_version="1", seconds=0.1, host="h", created="2025-01-01T00:00:00Z"))
    return manifest, {"stage": name, "task": task, "method": method, "key": key}


def run(store: Store, with_diagnostics: bool = True) -> tuple[dict, list, Manifest | None]:
    evals, entries, last = [], [], None
    for t, task in enumerate(TASKS):
        scores = {"method": "many", "tasks": TASKS[: t + 1], "scores": [50.0] * (t + 1), "tau": None}
        manifest, entry = stage(store, "eval", task, "many", "scores", scores, f"{t:064x}")
        evals.append(("many", t, manifest))
        entries.append(entry)
        if with_diagnostics:
            value = {"format": FORMAT, "tasks": t + 1, "groups": {LAYER: {
                "layers": [LAYER], "fit_error": {LAYER: [0.25 * (t + 1)] * (t + 1)},
                "leakage": {LAYER: [[1.0 if i == j else 0.5 for j in range(t + 1)] for i in range(t + 1)]},
                "energy": {LAYER: [1.0] * (t + 1)}}}}
            last, entry = stage(store, DIAGNOSTICS_CHAIN.stage, task, "many", DIAGNOSTICS_CHAIN.read, value,
                                f"{t + 16:064x}")
            entries.append(entry)
    return {"tasks": TASKS, "methods": ["many"], "stages": entries}, evals, last


def test_the_last_step_diagnostics_join_the_report_of_the_flow_and_of_many_report(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    summary, evals, last = run(store)
    report = build_report(store, TASKS, ["many"], evals, diagnostics=last)
    diagnostics = report["diagnostics"]
    assert diagnostics["after"] == "b" and diagnostics["fit_error"]["layers"] == {LAYER: [0.5, 0.5]}
    assert diagnostics["fit_error"]["worst"][0] == {"layer": LAYER, "task": "a", "value": 0.5}
    assert diagnostics["leakage"]["mean"] == 0.5
    assert report_from_run(store, summary) == report
    assert build_report(store, TASKS, ["many"], evals) == {k: v for k, v in report.items() if k != "diagnostics"}
    assert last_diagnostics({DIAGNOSTICS_CHAIN.stage: ["link0", "link1"], "merge": ["m0", "m1"]}) == "link1"
    assert last_diagnostics({"merge": ["m0"]}) is None


def test_a_run_without_diagnostics_has_no_diagnostics_key_and_a_collected_one_is_an_error(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    summary, _, _ = run(store, with_diagnostics=False)
    assert "diagnostics" not in report_from_run(store, summary)
    summary, _, _ = run(Store.open(str(tmp_path / "other")))
    with pytest.raises(StoreError, match="merge_diagnostics stage 000000000000 of many on b is no longer in the store"):
        report_from_run(store, {**summary, "stages": [
            *(e for e in summary["stages"] if e["stage"] == "eval"),
            {"stage": DIAGNOSTICS_CHAIN.stage, "task": "b", "method": "many", "key": "0" * 64}]})
