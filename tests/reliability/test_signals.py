"""Ctrl-C during `many run` (issue #15): `many run` of the small stream as a real command in a process group of its
own, like a shell's job, with the CLI's own defaults (no Prefect API configured: it starts a local Prefect server;
RAY_AUTH_MODE unset). Mid-finetune, every socket of the run's processes — the supervisor, the Prefect server, the
worker, Ray's GCS, raylet and workers — is bound to loopback. Then SIGINT to the process group, as a terminal
sends it: exit 130 within 10 s, one line on stderr and no traceback or Prefect event dump, none of the run's
processes left (by process tree, and by the run's Ray directory), the store sound, and the rerun completes with
every stage finished before the signal reported cached and not started again. SIGTERM → 143 is tested on
`many serve` (tests/deploy/test_serve.py) and, for both signals, on the supervisor alone (tests/flows/test_supervise.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.processes import beyond_loopback, gone, listening, tree
from tests.reliability.conftest import (
    RUN_SECONDS,
    assert_store_sound,
    kill_session,
    labels,
    many,
    many_env,
    start_many,
    started_stages,
    where,
    write_config,
)

pytestmark = pytest.mark.slow


def is_progress(line: str) -> bool:
    """A stage's progress line (`  finetune  chart-qa  running …`), as opposed to a message of the CLI."""
    return line.startswith("  ")


def cli_defaults(tmp: Path) -> dict[str, str]:
    """The subprocess environment of the reliability suite, less its RAY_AUTH_MODE=disabled: the CLI's defaults."""
    env = many_env(tmp)
    env.pop("RAY_AUTH_MODE")
    return env


def test_ctrl_c_mid_finetune_stops_everything_in_seconds_and_the_rerun_resumes(tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    env = cli_defaults(tmp_path)
    argv = ["run", "--json", "--config", str(write_config(tmp_path / "small.yaml")), "--store", store]
    process = start_many(argv, env)
    lines: list[tuple[float, str]] = []  # (when read, line) of the run's stderr
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line.rstrip("\n")) for line in process.stderr))
    reader.start()
    try:
        deadline = time.monotonic() + RUN_SECONDS
        while not any(line.split()[:1] == ["finetune"] and "running" in line for _, line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "\n".join(line for _, line in lines)
            time.sleep(0.1)
        time.sleep(1.0)  # a finetune is computing in a Ray worker

        pids = tree(process.pid)
        commands = [" ".join(psutil.Process(pid).cmdline()) for pid in pids]
        assert any("prefect server start --host 127.0.0.1" in c for c in commands), commands
        assert {"gcs_server", "raylet"} <= {psutil.Process(pid).name() for pid in pids}
        assert listening(pids) and beyond_loopback(pids) == []

        signalled = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C: to the foreground process group
        process.wait(timeout=30)
        stopped = time.monotonic() - signalled
        reader.join(timeout=10)
    finally:
        kill_session(process)
    err = "\n".join(line for _, line in lines)
    assert process.returncode == 130, err
    assert stopped < 10
    assert "Traceback" not in err and "EventsWorker" not in err
    after = [line for when, line in lines if when >= signalled]
    # Progress lines the worker printed just before it was frozen may be read after the signal; nothing else is.
    assert [line for line in after if not is_progress(line)] == [after[-1]], after
    assert after[-1].startswith("many: interrupted by SIGINT; stopped"), after
    assert gone(pids) == []
    ray_dir = env["RAY_TMPDIR"]
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if ray_dir in " ".join(p.info["cmdline"] or [])]

    done = set(assert_store_sound(store))
    assert any(name.startswith("base/") for name in done), done  # the signal came after stages had finished
    rerun = many(argv, env)
    assert rerun.code == 0, rerun.err
    names = labels(rerun.summary)
    assert all(s["status"] == "cached" for s in rerun.summary["stages"] if f"{s['stage']}/{s['key']}" in done)
    assert not {(names[n][0], where(*names[n][1:])) for n in done} & started_stages(rerun.err)
    assert_store_sound(store)
