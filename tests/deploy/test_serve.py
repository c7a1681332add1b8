"""`many serve` on a fresh machine (issue #15): the real command, with no Prefect API configured, serves a
15-second interval schedule over a growing task source (a directory of specs). The local Prefect server it
starts schedules the runs on its own: the first scheduled run computes the two tasks there at the start; a task
spec added after it makes a later scheduled run compute exactly that task's stages, its merge and its eval row.
The run summaries in the store are the runs' own record. Then SIGTERM: exit 143 within 10 s, one line, every
process of the command gone, and every socket they had open bound to loopback."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.deploy.conftest import computed, tiny
from tests.processes import beyond_loopback, gone, listening, tree
from tests.reliability.conftest import _remove_scratch, kill_session, many_env, start_many  # noqa: F401 - fixture

pytestmark = pytest.mark.slow
SECONDS = 420  # bound on waiting for one scheduled run (a cold one takes about a minute on 2 idle cores)


def summaries(store: Path) -> list[dict]:
    """Every run summary in the store (each scheduled run writes its own), oldest first."""
    runs = store / "runs"
    return [json.loads(p.read_text()) for p in sorted(runs.glob("2*.json"))] if runs.exists() else []


def test_serve_runs_the_schedule_on_its_own_server_picks_up_new_tasks_and_stops_on_sigterm(tmp_path: Path) -> None:
    source, store = tmp_path / "stream", tmp_path / "store"
    source.mkdir()
    (source / "001-style-cls.yaml").write_text("style-cls")
    (source / "002-chart-qa.yaml").write_text("chart-qa")
    config = {k: v for k, v in tiny(methods=["many"]).items() if k != "tasks"} | {"task_source": {"url": str(source)}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = many_env(tmp_path)
    env.pop("RAY_AUTH_MODE")  # the CLI's defaults
    assert "PREFECT_API_URL" not in env
    process = start_many(["serve", "--config", str(tmp_path / "serve.yaml"), "--store", str(store), "--interval", "15"], env)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line.rstrip("\n")) for line in process.stderr))
    reader.start()

    def wait_for(what: str, predicate) -> list[dict]:
        deadline = time.monotonic() + SECONDS
        while not predicate(runs := summaries(store)):
            assert process.poll() is None, f"serve exited {process.returncode}: " + "\n".join(line for _, line in lines)
            assert time.monotonic() < deadline, f"no {what} in {SECONDS} s: " + "\n".join(line for _, line in lines)
            time.sleep(1)
        return runs

    try:
        first = wait_for("first scheduled run", bool)[0]
        assert first["tasks"] == ["001-style-cls", "002-chart-qa"]
        assert {s["status"] for s in first["stages"]} == {"computed"}
        (source / "003-icon-qa.yaml").write_text("icon-qa")
        runs = wait_for("run with the new task", lambda runs: any(len(r["tasks"]) == 3 for r in runs))
        grown = next(r for r in runs if len(r["tasks"]) == 3)
        task = "003-icon-qa"
        assert computed(grown) == {("data", task, None), ("finetune", task, None), ("prototypes", task, None),
                                   ("stats", task, None), ("merge", task, "many"),
                                   ("merge_diagnostics", task, "many"), ("eval", task, "many")}
        assert len(runs) >= 2

        pids = tree(process.pid)
        commands = [" ".join(psutil.Process(pid).cmdline()) for pid in pids]
        assert any("prefect server start --host 127.0.0.1" in c for c in commands), commands
        assert listening(pids) and beyond_loopback(pids) == []
        signalled = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        stopped = time.monotonic() - signalled
        reader.join(timeout=10)
    finally:
        kill_session(process)
    err = [line for _, line in lines]
    assert process.returncode == 143, err
    assert stopped < 10
    assert err[0].startswith("serving deployment 'scheduled-update/many' every 15 s")
    assert [line for when, line in lines if when >= signalled] == [err[-1]]
    assert err[-1].startswith("many: terminated by SIGTERM; stopped")
    assert not any("Traceback" in line or "EventsWorker" in line for line in err)
    assert gone(pids) == []
