"""Critical path first (tasks/gate.py) changes only the order stages run in: the same stages, keys, output bytes and
report as a run that leaves the order to Ray (`ray.critical_path_first: false`). Slow: two cold tiny runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.store import Store
from tests.flows.e2e import TINY, run, write_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("harness")]


def outputs(store: str, summary: dict) -> dict:
    """(stage, task, method) → its outputs' digests, but the loss curves (wall-clock seconds: docs/design.md §2.1)."""
    opened = Store.open(store)
    found = {}
    for s in summary["stages"]:
        manifest = opened.read_manifest(s["stage"], s["key"])
        found[(s["stage"], s["task"], s["method"])] = {k: v.digest for k, v in manifest.outputs.items() if k != "losses"}
    return found


def test_priority_order_keeps_every_output(tmp_path: Path, capsys) -> None:
    runs = {}
    for first in (False, True):
        config = write_config(tmp_path / f"tiny-{first}.yaml", tasks=["style-cls", "chart-qa", "icon-qa"],
                              methods=["many", "individual", "seqlora"], ray={**TINY["ray"], "critical_path_first": first})
        store = str(tmp_path / f"store-{first}")
        summary = run(capsys, "--config", str(config), "--store", store)
        assert {s["status"] for s in summary["stages"]} == {"computed"}
        runs[first] = (summary, outputs(store, summary))
    (plain, plain_outputs), (ordered, ordered_outputs) = runs[False], runs[True]
    assert [(s["stage"], s["task"], s["method"], s["key"]) for s in ordered["stages"]] == \
        [(s["stage"], s["task"], s["method"], s["key"]) for s in plain["stages"]]
    assert ordered_outputs == plain_outputs
    assert ordered["report"] == plain["report"]
