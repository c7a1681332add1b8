"""The operator's experience of the `many` command line (issue #15): `--version`, a config typo reported in about a
second without torch, `ls` columns and filters, read-only commands that never create a store, and the exit-code
table of README "Running" / docs/design.md §5.4. Real subprocesses where start-up cost or imports are the point."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft")


def python(code: str, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `python -c code args…` in the project root; (the finished process, its wall seconds)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**_env(), "PYTHONPATH": str(ROOT)})
    return done, time.monotonic() - started


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("MANY_", "PREFECT_", "RAY_"))}


def loaded(modules: tuple[str, ...] = HEAVY) -> str:
    """Python source printing, as the last stdout line, which of `modules` the process has imported."""
    return f"import json, sys; print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"


# -- 1. --version -----------------------------------------------------------------------------------------


def test_version_prints_the_package_version_without_torch() -> None:
    done, seconds = python(f"from flows.cli import main; code = main(['--version']); {loaded()}; sys.exit(code)")
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    import many

    assert lines[0] == f"many {many.__version__}"
    assert json.loads(lines[-1]) == [], f"--version imported {lines[-1]}"
    print(f"many --version: {seconds:.2f} s")


def test_the_version_is_the_distributions() -> None:
    import many

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == many.__version__
