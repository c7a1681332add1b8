"""End to end (slow): live progress and training records of `many run` on the tiny stream (docs/design.md §4
"Progress", §2.1 `losses`). stderr is not a TTY here, so the progress comes as plain lines: each training stage's
steps with their total and loss, the `[done/total]` stage count; the same progress reaches the stages' Prefect task
runs as log lines (what Prefect's UI shows); every training stage stores one loss row per step, and `many report
--out` draws them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flows.cli import main
from tasks.store import Store
from tests.flows.e2e import TINY, stored_losses, write_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("harness")]

METHODS = ["seqlora"]  # base, finetune and a training chain in 8 stages (tests/flows/test_methods.py: CRAM, Fwd-Prompt)
TRAINING = {"base", "finetune", "seqlora"}


def prefect_logs(name: str) -> list[str]:
    """Messages of the logger `name` that reached the Prefect API of the module's test harness."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(limit=200) if log.name == name]


def test_run_shows_progress_and_stores_loss_curves(tmp_path: Path, capsys) -> None:
    store = str(tmp_path / "store")
    config = write_config(tmp_path / "tiny.yaml", methods=METHODS)
    capsys.readouterr()
    assert main(["run", "--json", "--config", str(config), "--store", store, "--tasks", "2"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)

    steps = TINY["finetune"]["steps"]
    for task in ("style-cls", "chart-qa"):  # a line per finetune with its step count, total and loss
        lines = [line for line in err.splitlines() if line.split()[:2] == ["finetune", task]]
        assert any(re.search(rf"step \d+/{steps} \(\d+%\)  loss \d+\.\d{{4}}  [\d.]+ it/s  ETA", line) for line in lines), lines
        assert any(f"step {steps}/{steps} (100%)" in line for line in lines), lines  # the last step is always shown
    total = len(summary["stages"])
    assert f"[{total}/{total}] stages done  0 running  0 queued  0 waiting" in err.splitlines()
    assert re.search(rf"^\[\d+/{total}\] stages done  \d+ running  \d+ queued  \d+ waiting$", err, re.MULTILINE)
    assert re.search(r"^  eval .* answer \d+/\d+ \(100%\)", err, re.MULTILINE)  # evals report answers

    opened = Store.open(store)
    trained = [s for s in summary["stages"] if s["stage"] in TRAINING]
    assert {s["stage"] for s in trained} == TRAINING
    for entry in trained:
        losses = stored_losses(opened, entry)
        expected = TINY["base"]["pretrain_steps"] if entry["stage"] == "base" else steps
        assert losses["step"] == list(range(1, expected + 1)), entry
        assert all(loss > 0 for loss in losses["loss"]) and len(losses["lr"]) == expected

    logged = prefect_logs("many.progress")  # the Prefect task runs' logs: what Prefect's UI shows
    assert any(re.match(rf"finetune style-cls: step {steps}/{steps} \(100%\), loss \d", m) for m in logged), logged

    capsys.readouterr()
    assert main(["report", "--store", store, "--out", str(tmp_path / "report")]) == 0
    figure = tmp_path / "report" / "losses.png"
    assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 5000
    assert "Training loss" in (tmp_path / "report" / "report.html").read_text()
