"""The processes of `many run` and `many serve` (docs/design.md §4): who starts what, who stops it, and signals.

    many run|serve …                 the supervisor: the process you started, in the terminal's process group
     ├─ prefect server start         --host 127.0.0.1, its own session; only when no Prefect API is configured
     └─ many run|serve … (worker)    its own session; PREFECT_API_URL → that server (or the configured one)
          ├─ Ray: gcs_server, raylet, workers          the local cluster, loopback only (tasks/runtime.py)
          └─ (serve) one process per flow run, each with its own local Ray

Ctrl-C (SIGINT to the terminal's foreground process group) and SIGTERM reach only the supervisor: the worker
and the server are in sessions of their own, so neither dies under the other's feet mid-request (a Prefect
server killed by the same Ctrl-C used to leave the run retrying its API for minutes). The supervisor prints
one line, SIGKILLs the worker's whole process tree — each process frozen (SIGSTOP) before its children are
listed, so none forks one that escapes — stops the server, and exits 128 + the signal: 130, 143. SIGKILL is
what the store is built to survive (docs/design.md §3: a stage is done iff its manifest exists, and blobs are
written before it), so the next run resumes with every finished stage cached.

The worker and the server also die with the supervisor if it is killed outright (Linux `PR_SET_PDEATHSIG`),
and Ray's own processes die with the worker (Ray fate-shares them with the driver), so no path leaves a
server or a cluster running. Without a configured Prefect API (`PREFECT_API_URL`, or a Prefect profile's) the
supervisor starts `prefect server start` — for `many serve` with its scheduler, which makes the schedule fire
(Prefect's ephemeral API runs none) — and stops it on the way out; a configured API that does not answer is
exit 2 at once. Prefect's server has no authentication, so it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

SUPERVISOR = "MANY_SUPERVISOR"  # set in the worker's environment: the supervisor's pid
LOCAL_SERVER = "MANY_LOCAL_PREFECT_SERVER"  # set in the worker's environment: the API URL of the server it started
SERVER_START_SECONDS = 180.0  # a first start migrates a fresh database: slow on busy cores
STOP_SECONDS = 5.0
SERVER_STOP_SECONDS = 3.0  # then SIGKILL: an idle server stops in about 1 s, one that served `many serve` took over 5
PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_A_SERVER = ("start one with `prefect server start --host 127.0.0.1` and "
                  "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")


class PrefectAPIError(RuntimeError):
    """The local Prefect server would not start, or stopped."""


class PrefectAPIUnreachable(ValueError):
    """The configured Prefect API does not answer (bad input: exit 2, like a store endpoint that does not)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the supervisor."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that has the child get `sig` when this process dies (Linux; None elsewhere).

    Safe here: the supervisor has no other threads when it starts children."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
            os._exit(1)

    return preexec


def configured_api_url() -> str | None:
    """The Prefect API this process would use: PREFECT_API_URL from the environment or the active profile."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def api_answers(api_url: str, timeout: float = 5.0, healthy: bool = True) -> bool:
    """Whether the Prefect API at `api_url` answers its health check (`healthy`), or answers at all (an API that
    wants credentials, like Prefect Cloud's, refuses it)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200 or not healthy
    except urllib.error.HTTPError:
        return not healthy
    except (OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPrefectServer:
    """`prefect server start --host 127.0.0.1` on a free port, in a session of its own (out of the terminal's
    process group), dying with this process; its output goes to a temporary file, read back on failure.

    With `scheduler` off (`many run`) it schedules nothing, like Prefect's ephemeral API: the database in
    PREFECT_HOME may hold the deployment of an earlier `many serve`, whose schedule stays on when that serve is
    killed, and nobody is there to run what a scheduler would create for it."""

    def __init__(self, scheduler: bool) -> None:
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-ui",
             *([] if scheduler else ["--no-scheduler", "--no-late-runs"])],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent(signal.SIGKILL),  # noqa: PLW1509 - the supervisor runs no other thread
            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        )

    def failure(self) -> str | None:
        """None while the server runs; else why it stopped (its exit code and last output line)."""
        code = self.process.poll()
        if code is None:
            return None
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return f"the local Prefect server exited with code {code}" + (f": {lines[-1]}" if lines else "")

    def stop(self) -> None:
        """SIGTERM its process group (uvicorn shuts down), SIGKILL after SERVER_STOP_SECONDS."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(SERVER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self.log.close()


def freeze_tree(pid: int) -> list:
    """`pid` and every process below it, each stopped (SIGSTOP) before its children are listed, so none can fork
    a child that escapes the list; processes that left the session (setsid) are found too, by parent."""
    import psutil

    found: dict[int, psutil.Process] = {}
    try:
        frontier = [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return []
    while frontier:
        process = frontier.pop()
        if process.pid in found:
            continue
        try:
            process.suspend()
            found[process.pid] = process
            frontier.extend(process.children())
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def kill_all(processes: list, seconds: float = STOP_SECONDS) -> None:
    """SIGKILL `processes` and wait until each is gone or a zombie (its parent may be one of them)."""
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + seconds
    for process in processes:
        while time.monotonic() < deadline:
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (`freeze_tree`)."""
    kill_all(freeze_tree(pid))


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def supervise(command: str, argv: list[str]) -> int:
    """Run `many ARGV` (`command` is `run` or `serve`) as a worker process under this one (module docstring);
    returns the exit code."""
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    server: LocalPrefectServer | None = None
    worker: subprocess.Popen | None = None
    try:
        try:
            env = {**os.environ, SUPERVISOR: str(os.getpid())}
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
            api_url = configured_api_url()
            if api_url:
                if not api_answers(api_url, healthy=False):
                    raise PrefectAPIUnreachable(f"the Prefect API at {api_url} (PREFECT_API_URL) does not answer; start "
                                                f"that server, or unset PREFECT_API_URL and many starts a local one")
            else:
                server = LocalPrefectServer(scheduler=command == "serve")
                env["PREFECT_API_URL"] = env[LOCAL_SERVER] = server.api_url
            worker = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent(signal.SIGKILL))  # noqa: PLW1509 - see above
            while True:  # the worker waits for the server itself (await_local_server); here: did either stop?
                try:
                    code = worker.wait(0.5)
                    break
                except subprocess.TimeoutExpired:
                    why = server.failure() if server else None
                    if why:
                        kill_tree(worker.pid)
                        worker.wait()
                        raise PrefectAPIError(f"{why}; {START_A_SERVER}")
        except Interrupted as stop:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            frozen = freeze_tree(worker.pid) if worker is not None else []  # first: not one more line from them
            verb = "interrupted" if stop.signum == signal.SIGINT else "terminated"
            print(f"many: {verb} by {signal.Signals(stop.signum).name}; stopped (finished stages stay cached: "
                  "the next run resumes)", file=sys.stderr, flush=True)
            kill_all(frozen)
            if worker is not None:
                worker.wait()
            return 128 + stop.signum
        finally:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)  # stopping anyway: a late signal must not cut the clean-up short
            if worker is not None and worker.poll() is None:  # an error of this process: leave nothing behind
                kill_tree(worker.pid)
            if server is not None:
                server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:  # the worker was killed by a signal: end the same way, as a shell would see it
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # the two whose handler cannot be set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # a signal whose default is not to terminate
    return code


def await_local_server(seconds: float = SERVER_START_SECONDS) -> None:
    """In a worker whose supervisor started a Prefect server: wait until its API answers (it starts while the
    worker imports and checks its inputs). No-op otherwise."""
    api_url = os.environ.get(LOCAL_SERVER)
    if not api_url:
        return
    deadline = time.monotonic() + seconds
    while not api_answers(api_url, timeout=2.0):
        if time.monotonic() > deadline:
            raise PrefectAPIError(f"the local Prefect server at {api_url} did not answer in {seconds:.0f} s; {START_A_SERVER}")
        time.sleep(0.2)
