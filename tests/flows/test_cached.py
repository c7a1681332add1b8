"""A rerun with nothing new (flows/cached.py, docs/design.md §4 "Cache first"): `many run` from the command line
answers it before Prefect, Ray or torch load, with the same stages, keys and report as the flow, and the same table.
Slow: one cold tiny run through the flow first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cached import cached_run
from flows.stream import run_config
from many.report import text_table
from tests.flows.e2e import run, write_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("harness")]

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "prefect", "transformers", "peft")
COMMAND = """
import json, sys
sys.argv = ["many", *sys.argv[1:]]
from flows.cli import main
code = main()  # no argument list: the command-line path (supervisor unless nothing is to do)
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
sys.exit(code)
""".format(heavy=HEAVY)


def many_command(*argv: str) -> subprocess.CompletedProcess:
    """`many ARGV` as the command line runs it, in a fresh interpreter with no Prefect API configured; its last
    stderr line lists the heavy modules it imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", COMMAND, *argv], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


def test_cached_rerun_imports_no_torch_ray_or_prefect_and_prints_the_same(tmp_path: Path, capsys) -> None:
    store = str(tmp_path / "store")
    config = write_config(tmp_path / "tiny.yaml", tasks=["style-cls", "chart-qa"], methods=["many", "seqlora"])
    cold = run(capsys, "--config", str(config), "--store", store)
    assert {s["status"] for s in cold["stages"]} == {"computed"}

    done = many_command("run", "--json", "--config", str(config), "--store", store)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []  # no torch, ray, prefect, transformers, peft
    rerun = json.loads(done.stdout)
    assert rerun["ray_started"] is False and {s["status"] for s in rerun["stages"]} == {"cached"}
    keyed = lambda summary: [(s["stage"], s["task"], s["method"], s["key"]) for s in summary["stages"]]  # noqa: E731
    assert keyed(rerun) == keyed(cold)  # the flow's stages, in the flow's order
    assert rerun["report"] == cold["report"]
    latest = json.loads((tmp_path / "store" / "runs" / "latest.json").read_text())
    assert latest["run_id"] == rerun["run_id"] and latest["config_fingerprint"] == cold_fingerprint(tmp_path, cold)

    table = many_command("run", "--config", str(config), "--store", store)
    assert table.returncode == 0, table.stderr
    assert table.stdout == text_table(cold["report"]) + "\n"
    assert f"0 computed, {len(cold['stages'])} cached" in table.stderr
    assert sum(" cached " in line for line in table.stderr.splitlines()) == len(cold["stages"])


def cold_fingerprint(tmp_path: Path, cold: dict) -> str:
    return json.loads((tmp_path / "store" / "runs" / f"{cold['run_id']}.json").read_text())["config_fingerprint"]


def test_a_stage_to_compute_is_left_to_the_flow(tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    config = write_config(tmp_path / "tiny.yaml", tasks=["style-cls"], methods=["individual"])
    assert cached_run(run_config(str(config), str(store))) is None  # no store yet: nothing is cached
    assert not store.exists()  # and the check created none
    run(capsys, "--config", str(config), "--store", str(store))
    runs = sorted(p.name for p in (store / "runs").iterdir())
    grown = write_config(tmp_path / "grown.yaml", tasks=["style-cls", "chart-qa"], methods=["individual"])
    assert cached_run(run_config(str(grown), str(store))) is None  # chart-qa's stages are not cached
    assert sorted(p.name for p in (store / "runs").iterdir()) == runs  # nothing written
    assert not list((store / "leases").iterdir())  # its lease released
    assert cached_run(run_config(str(config), str(store)))["run_id"] not in runs  # the first stream is cached
