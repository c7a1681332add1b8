"""benchmarks/common.py: a benchmark stopped by SIGTERM while its pipeline computes exits 143 at once and takes its
ephemeral Prefect server and its Ray cluster down with it: exiting through Python there used to abort in Ray's
teardown (exit 134) and orphan the server."""

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
import sys
from pathlib import Path
from benchmarks.common import quiet_environment, stream_config
quiet_environment(Path(sys.argv[1]))
from flows.pipeline import continual_update

config = stream_config(smoke=True)  # examples/tiny.yaml: a base to pretrain, then finetunes — minutes of stages
continual_update(config.model_copy(update={"store": config.store.model_copy(update={"url": sys.argv[1] + "/store"})}))
"""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ")[-1].startswith("Z"))  # a zombie has exited


@pytest.mark.slow
def test_sigterm_mid_pipeline_stops_the_benchmarks_prefect_server_and_ray(tmp_path: Path) -> None:
    run = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not any("gcs_server" in _name(pid) for pid in _children(run.pid)):  # Ray is up: stages are computing
            assert run.poll() is None and time.monotonic() < deadline, "the pipeline never started Ray"
            time.sleep(0.5)
        time.sleep(5)  # a stage is running on a Ray worker
        children = _children(run.pid)
        assert any("uvicorn" in _name(pid) for pid in children), "no ephemeral Prefect server: nothing to check"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=90) == 128 + signal.SIGTERM, run.stderr.read()[-3000:]
        assert "Started a local Ray instance" not in run.stderr.read()  # no stage thread started Ray again
        deadline = time.monotonic() + 30
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [_name(pid) for pid in children if _alive(pid)], "outlived the benchmark"
    finally:
        run.kill()
        for pid in filter(_alive, children):  # never leave a server or a raylet behind, whatever failed
            os.kill(pid, signal.SIGKILL)
