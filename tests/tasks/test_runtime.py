"""The local Ray cluster `ensure_ray` starts (tasks/runtime.py) is reachable from this machine only: every socket
its processes listen on is bound to loopback, and it runs with token authentication on a token of its own,
written nowhere (issue #15). A fresh process, so the cluster is the one `ensure_ray` starts with the defaults a
`many run` has (RAY_AUTH_MODE unset)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from tests.processes import beyond_loopback, is_loopback, listening

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import json, os, sys
from tasks.runtime import ensure_ray, shutdown_ray

ensure_ray(None, 1, 100)  # imports Ray, as a stage does
import ray
auth = ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote())
print(json.dumps({"auth": auth, "node_ip": ray.util.get_node_ip_address()}), flush=True)
sys.stdin.readline()  # the cluster stays up until the test has looked at it
shutdown_ray()
"""


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]))


def test_a_local_cluster_listens_on_loopback_only_with_a_token_of_its_own(tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, text=True, start_new_session=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        seen = json.loads(driver.stdout.readline())
        pids = [driver.pid, *(p.pid for p in psutil.Process(driver.pid).children(recursive=True))]
        names = {psutil.Process(pid).name() for pid in pids}
        assert {"gcs_server", "raylet"} <= names, names
        assert listening(pids) and beyond_loopback(pids) == []
        assert seen == {"auth": "token", "node_ip": "127.0.0.1"}
        assert not (tmp_path / ".ray" / "auth_token").exists()
        driver.communicate("\n", timeout=120)
        assert driver.returncode == 0
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
