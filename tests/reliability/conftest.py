"""Fixtures and helpers of the reliability suite (issue #9): `many run` as a real subprocess in its own
session (so a SIGKILL takes the driver, Ray and its workers down together), and store inspection. The S3
fixtures (moto over HTTP, the fault-injecting proxy) are the shared ones of tests/conftest.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tasks.store import Manifest, Store

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
# The kill/corruption/concurrency stream: two tasks, the MAny method only (its RLS chain is the merged adapter).
SMALL = {**TINY, "tasks": ["style-cls", "chart-qa"], "methods": ["many"]}
RUN_SECONDS = 420  # bound on one `many run` of the small stream (a cold one takes ~30 s on 2 busy cores)


def write_config(path: Path, **changes: object) -> Path:
    path.write_text(yaml.safe_dump({**SMALL, **changes}))
    return path


@dataclass(frozen=True)
class Outcome:
    code: int  # negative: killed by that signal
    out: str
    err: str

    @property
    def summary(self) -> dict:
        return json.loads(self.out)

    @property
    def last_line(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


def many_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a `many` subprocess: offline, quiet, one thread, its own Prefect home and Ray dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANY_", "PREFECT_", "RAY_"))}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        PREFECT_HOME=prefect_home(tmp), PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240", RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_dir(tmp), MANY_CACHE_DIR=str(tmp / "cache"),
    )
    env.update(extra)
    return env


_SCRATCH: set[Path] = set()  # outside pytest's tmp dirs; removed at the end of the session
_PREFECT_TEMPLATE: list[Path] = []


def ray_dir(tmp: Path) -> str:
    """A short Ray temp dir per test dir (Ray's socket paths must stay under 108 bytes)."""
    path = Path("/tmp") / f"r9-{hashlib.sha256(str(tmp).encode()).hexdigest()[:10]}"
    path.mkdir(exist_ok=True)
    _SCRATCH.add(path)
    return str(path)


def prefect_home(tmp: Path) -> str:
    """`tmp/prefect`, a Prefect home whose database is already migrated (a copy of one migrated once per
    session): migrating is most of a fresh ephemeral server's start-up, which can outlast its timeout on
    busy cores. Each test dir gets its own, so concurrent runs do not share one SQLite file."""
    if not _PREFECT_TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="r9-prefect-"))
        _SCRATCH.add(template)
        env = {**os.environ, "PREFECT_HOME": str(template), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                       check=True, capture_output=True, timeout=RUN_SECONDS)
        _PREFECT_TEMPLATE.append(template)
    home = tmp / "prefect"
    if not home.exists():
        shutil.copytree(_PREFECT_TEMPLATE[0], home)
    return str(home)


@pytest.fixture(scope="session", autouse=True)
def _remove_scratch() -> Iterator[None]:
    yield
    for path in _SCRATCH:
        shutil.rmtree(path, ignore_errors=True)


def start_many(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen, timeout: float = RUN_SECONDS, err_lines: list[str] | None = None) -> Outcome:
    """Wait for `process`; whatever happens, leave nothing of its session running."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(process)
        out, err = process.communicate()
        pytest.fail(f"`many` ran past {timeout} s; stderr tail: {err[-2000:]}")
    kill_session(process)  # Ray processes of a killed driver
    return Outcome(process.returncode, out, "".join(err_lines or []) + err)


def kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def many(argv: list[str], env: dict[str, str], *, kill_after_first_stage_seconds: float | None = None) -> Outcome:
    """Run `many …`; with `kill_after_first_stage_seconds`, SIGKILL its whole session that long after its
    first stage starts computing (a time after start-up, so busy cores do not turn it into a start-up kill)."""
    process = start_many(argv, env)
    if kill_after_first_stage_seconds is None:
        return finish(process)
    lines: list[str] = []
    for line in process.stderr:
        lines.append(line)
        if " running " in line:
            break
    time.sleep(kill_after_first_stage_seconds)
    kill_session(process)
    return finish(process, err_lines=lines)


def manifests(store_url: str) -> dict[str, Manifest]:
    """Every manifest in the store by `<stage>/<key>`, each one parsed (a torn manifest fails here)."""
    store = Store.open(store_url)
    root = Path(store.url.removeprefix("file://"))
    found = {}
    for path in sorted((root / "stages").glob("*/*.json")):
        found[f"{path.parent.name}/{path.stem}"] = store.read_manifest(path.parent.name, path.stem)
    return found


def assert_store_sound(store_url: str) -> dict[str, Manifest]:
    """No manifest points at a missing or corrupt blob (every byte re-hashed), but for a superseded merge state that
    `gc --keep-last` collected (docs/design.md §3.4): absent as a whole, as merge's output or the next merge's input."""
    from tasks.catalog import recomputable_outputs

    collectable = recomputable_outputs()
    store = Store.open(store_url)
    found = manifests(store_url)
    for name, manifest in found.items():
        for role, refs in (("input", manifest.inputs), ("output", manifest.outputs)):
            for artifact, ref in refs.items():
                if (manifest.stage in collectable and (role == "input" or artifact in collectable[manifest.stage])
                        and not store.has_blob(ref.digest)):
                    continue
                assert store.verify(ref) == [], f"{name} {role} {artifact} points at missing/corrupt blobs"
    return found


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: relative path → (size, mtime_ns); {} if `root` does not exist."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def final_adapter_digest(store_url: str, summary: dict) -> str:
    """The merged adapter of the stream's last task (merge[T]'s `adapter` output digest: a directory
    listing of the files' sha256, so equal digests mean bit-identical files)."""
    last = [s for s in summary["stages"] if s["stage"] == "merge"][-1]
    return Store.open(store_url).read_manifest("merge", last["key"]).outputs["adapter"].digest


def labels(summary: dict) -> dict[str, tuple[str, str | None, str | None]]:
    """stage/key → (stage, task, method), as the progress lines name them."""
    return {f"{s['stage']}/{s['key']}": (s["stage"], s["task"], s["method"]) for s in summary["stages"]}


def started_stages(err: str) -> set[tuple[str, str]]:
    """(stage, where) of every stage that a run's progress lines say started computing."""
    found = set()
    for line in err.splitlines():
        parts = line.split()
        if "running" in parts and parts[0].isidentifier():
            found.add((parts[0], " ".join(parts[1:parts.index("running")])))
    return found


def where(task: str | None, method: str | None) -> str:
    return " ".join(filter(None, [task, f"[{method}]" if method else None]))


def wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """One uninterrupted cold `many run` of the small stream: (store URL, run summary), the result every
    resumed, repaired or concurrent run must reproduce bit for bit. Tests copy the store, never change it."""
    tmp = tmp_path_factory.mktemp("reference")
    store = f"file://{tmp / 'store'}"
    outcome = many(["run", "--json", "--config", str(write_config(tmp / "small.yaml")), "--store", store], many_env(tmp))
    assert outcome.code == 0, outcome.err
    return store, outcome.summary
