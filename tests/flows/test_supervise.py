"""The supervisor of `many run` / `many serve` (flows/supervise.py), fast part: a process tree is killed whole,
even a grandchild in a session of its own; SIGINT / SIGTERM during a run give one line and 130 / 143 with the
worker's processes gone; a configured Prefect API that does not answer is one line and exit 2 at once; `many
serve`'s schedules. The full paths (Prefect server, Ray workers mid-finetune, a schedule firing) are the slow
tests/reliability/test_signals.py and tests/deploy/test_serve.py."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flows.cli import main
from flows.serve import deployment
from flows.supervise import kill_tree
from tests.processes import alive, gone, tree

ROOT = Path(__file__).resolve().parents[2]
# Three generations, the middle one in a session of its own (as Prefect's runner starts flow runs), all asleep.
SLEEP = "import time; time.sleep(60)"
SPAWN = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {!r}], start_new_session={}); time.sleep(60)"
TREE = SPAWN.format(SPAWN.format(SLEEP, False), True)


def test_kill_tree_kills_grandchildren_that_left_the_session() -> None:
    root = subprocess.Popen([sys.executable, "-c", TREE])
    pids = tree(root.pid, 3)
    kill_tree(root.pid)
    root.wait(10)
    assert alive(pids) == []


@pytest.fixture()
def prefect_api() -> Iterator[str]:
    """An HTTP server that answers Prefect's health check, so the supervisor starts no Prefect server."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()


def many(argv: list[str], **env: str) -> subprocess.Popen:
    """`many ARGV` from the command line, in a process group of its own (like a shell's job)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "CRITICAL", **env},
    )


@pytest.mark.parametrize(("sig", "code", "line"), [
    (signal.SIGINT, 130, "many: interrupted by SIGINT; stopped"),
    (signal.SIGTERM, 143, "many: terminated by SIGTERM; stopped"),
], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_the_worker_with_one_line_and_128_plus_the_signal(
    sig: signal.Signals, code: int, line: str, prefect_api: str, tmp_path: Path
) -> None:
    """The supervisor is the only process in the job's process group; the signal (here during the worker's start)
    ends the worker's whole tree, and the supervisor says so in one line."""
    process = many(["run", "--config", str(ROOT / "examples" / "tiny.yaml"), "--store", str(tmp_path / "store")],
                   PREFECT_API_URL=prefect_api)
    pids = tree(process.pid, 2)
    deadline = time.monotonic() + 10  # a child is seen between its fork and its setsid: let it leave the group first
    while any(os.getpgid(pid) == process.pid for pid in pids[1:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(os.getpgid(pid) != process.pid for pid in pids[1:])  # the worker is outside the job's process group
    started = time.monotonic()
    os.killpg(process.pid, sig)  # what a terminal does on Ctrl-C: the whole foreground process group
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert process.returncode == code
    assert err.splitlines() == [err.strip()] and err.startswith(line), err
    assert alive(pids) == []


def test_a_worker_killed_by_a_signal_ends_the_supervisor_the_same_way(prefect_api: str, tmp_path: Path) -> None:
    """As a shell would see it: kill -9 inside the run (tests/reliability/test_kill.py's hook) is exit -9 outside."""
    process = many(["run", "--config", str(ROOT / "examples" / "tiny.yaml"), "--store", str(tmp_path / "store")],
                   PREFECT_API_URL=prefect_api)
    worker = tree(process.pid, 2)[1]
    os.kill(worker, signal.SIGKILL)
    _, err = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL and err == ""


def test_the_worker_and_the_prefect_server_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 leaves the supervisor no time to clean up: its children go by PR_SET_PDEATHSIG."""
    process = many(["run", "--config", str(ROOT / "examples" / "tiny.yaml"), "--store", str(tmp_path / "store")],
                   PREFECT_HOME=str(tmp_path / "prefect"))  # no PREFECT_API_URL: it starts a server
    pids = tree(process.pid, 3)
    assert any("prefect" in psutil.Process(pid).cmdline() and "server" in psutil.Process(pid).cmdline() for pid in pids)
    process.kill()
    process.wait(10)
    assert gone(pids) == []


def test_a_configured_prefect_api_that_does_not_answer_is_one_line_and_exit_2(tmp_path: Path) -> None:
    process = many(["run", "--config", str(ROOT / "examples" / "tiny.yaml"), "--store", str(tmp_path / "store")],
                   PREFECT_API_URL="http://127.0.0.1:9/api")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.splitlines() == [(
        "many: error: the Prefect API at http://127.0.0.1:9/api (PREFECT_API_URL) does not answer; start that "
        "server, or unset PREFECT_API_URL and many starts a local one")]
    assert not (tmp_path / "store").exists()


def test_serve_builds_an_interval_deployment_that_skips_runs_while_one_runs() -> None:
    built = deployment("/etc/many/continual.yaml", None, name="often", interval=15)
    [schedule] = built.schedules
    assert schedule.schedule.interval.total_seconds() == 15
    assert built.concurrency_limit == 1
    assert built.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    with pytest.raises(ValueError, match="exactly one schedule"):
        deployment(None, None, "0 * * * *", interval=15)


@pytest.mark.parametrize(("argv", "message"), [
    (["serve"], "many: error: many serve: one of the arguments --cron --interval is required"),
    (["serve", "--cron", "0 * * * *", "--interval", "60"], "many: error: many serve: argument --interval: not allowed with argument --cron"),
    (["serve", "--interval", "0"], "many: error: bad --interval 0: must be a positive number of seconds"),
], ids=["no-schedule", "two-schedules", "zero-interval"])
def test_serve_needs_exactly_one_good_schedule(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message
