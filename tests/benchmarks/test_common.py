"""benchmarks/common.py: a benchmark stopped by SIGTERM takes its ephemeral Prefect server down with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, time
from pathlib import Path
from benchmarks.common import quiet_environment
quiet_environment(Path(sys.argv[1]))
from prefect import flow

@flow
def nothing():
    return 1

nothing()  # starts the ephemeral Prefect server, a child process
print("ready", flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ")[-1].startswith("Z"))  # a zombie has exited


@pytest.mark.slow
def test_sigterm_stops_the_benchmarks_prefect_server(tmp_path: Path) -> None:
    run = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server: list[int] = []
    try:
        assert run.stdout.readline().strip() == "ready"
        server = _children(run.pid)
        assert server, "the flow started no Prefect server process: nothing to check"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(map(_alive, server)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(map(_alive, server)), f"Prefect server {server} outlived the benchmark"
    finally:
        run.kill()
        for pid in filter(_alive, server):  # never leave a server behind, whatever failed
            os.kill(pid, signal.SIGKILL)
