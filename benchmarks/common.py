"""What the benchmarks share: the examples directory, a quiet, offline, per-run environment, the Prefect warm-up
and a timer."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def quiet_environment(scratch: Path) -> None:
    """Offline Prefect/Ray settings, Prefect home and store cache under `scratch`; values already set win."""
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
        "PREFECT_HOME": str(scratch / "prefect"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": "/tmp/ray-bench",
        "MANY_CACHE_DIR": str(scratch / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    _exit_on_sigterm()


def _exit_on_sigterm() -> None:
    """SIGTERM (`kill`, a job scheduler stopping a long run) stops the ephemeral Prefect server this process started
    and exits at once, status 143: by default SIGTERM ends this process alone and leaves that server running.

    During a flow, Prefect's engine holds SIGTERM: it unwinds the flow (which ends its run before shutting Ray down,
    flows.pipeline) and then sends the signal again, to this handler. It exits without the interpreter's teardown:
    through sys.exit, that teardown aborted in Ray's (exit 134) before atexit stopped the server. Ray's local cluster
    dies with this process (Ray fate-shares it with its driver), and a stage killed mid-compute writes no manifest
    (docs/design.md §3), so the next run resumes. Only from the main thread, and only where nobody has set a handler."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop)


def _stop(signum: int, _frame: object) -> None:
    server = sys.modules.get("prefect.server.api.server")  # imported only if this process started one
    if server is not None:
        for instance in list(server.SubprocessASGIServer._instances.values()):
            instance.stop()  # SIGTERM, then SIGKILL after 5 s
    os._exit(128 + signum)


def stream_config(smoke: bool, path: Path | None = None):
    """The run config a pipeline benchmark streams: the run config file `path` when given, else examples/tiny.yaml
    when `smoke`, else the embedded mini-UCIT defaults (call after `quiet_environment`: it imports flows)."""
    from flows.config import RunConfig, load_config

    if path is not None:
        return load_config(path)
    return load_config(EXAMPLES / "tiny.yaml") if smoke else RunConfig()


def seed_count(parser, seeds: int | None, smoke: bool) -> int:
    """--seeds N (default 3, smoke 1), at least one."""
    seeds = seeds or (1 if smoke else 3)
    if seeds < 1:
        parser.error(f"--seeds {seeds}: need at least one seed")
    return seeds


def task_count(parser, tasks: int | None, smoke: bool, config) -> int:
    """--tasks N: the first N tasks of `config`'s stream (default all, smoke 2), within 1..len(stream)."""
    count = tasks or (2 if smoke else len(config.tasks))
    if not 1 <= count <= len(config.tasks):
        parser.error(f"--tasks {count}: the stream has {len(config.tasks)} tasks; choose 1..{len(config.tasks)}")
    return count


def warm_up_prefect() -> None:
    """Run an empty flow, so the ephemeral Prefect server starts outside every measurement (call after
    `quiet_environment`: it imports prefect)."""
    from prefect import flow

    @flow(name="bench-warm-up", persist_result=False)
    def warm_up() -> None:
        """Starts the ephemeral Prefect server outside every measurement."""

    warm_up()


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """What `call()` returns, and the seconds it took."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def many_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[dict, float, float]:
    """`many <args> --json` as a command run from the repository root: (its JSON summary, wall seconds, CPU seconds
    of it and the processes it waited for)."""
    argv = [sys.executable, "-m", "flows.cli", *args, "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=EXAMPLES.parent, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"many {args[0]} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout), wall, cpu
