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

import pytest

from flows.cli import main

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


# -- 5. config validation loads no torch -------------------------------------------------------------------


def test_the_run_config_and_the_row_registry_import_without_torch() -> None:
    from tasks.rows import BUILT_IN

    modules = ["flows.config", "tasks.rows", *BUILT_IN, "many.merging", "many.merging.config", "many.methods.cram",
               "many.methods.fwd_prompt"]
    done, _ = python("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + loaded())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_lazy_packages_still_export_every_name() -> None:
    import many.merging
    import many.methods.cram
    import many.methods.fwd_prompt

    for package in (many.merging, many.methods.cram, many.methods.fwd_prompt):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    from many.merging.registry import CONFIGS
    from many.merging.regmean import RegMeanConfig

    assert CONFIGS["regmean"] is RegMeanConfig  # one class, wherever it is imported from
    with pytest.raises(AttributeError):
        many.methods.cram.no_such_name  # noqa: B018


def test_a_config_typo_is_exit_2_in_about_a_second_without_torch(tmp_path: Path) -> None:
    """The real `main` in a fresh interpreter: one line naming the file and the key, exit 2, no torch, transformers
    or peft loaded (that is the regression check; the wall time only catches gross slowness on busy cores)."""
    config = tmp_path / "typo.yaml"
    config.write_text("tasks: [chart-qa]\nfinetune: {stepz: 3}\n")
    store = tmp_path / "store"
    done, seconds = python(
        f"from flows.cli import main; code = main(['run', '--config', {str(config)!r}, '--store', {str(store)!r}]); "
        f"{loaded()}; sys.exit(code)"
    )
    print(f"config typo: exit {done.returncode} after {seconds:.2f} s wall")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"many: error: {config}: finetune.stepz: unknown key"
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert not store.exists()
    assert seconds < 4.0, f"a config typo took {seconds:.1f} s to report (budget 2 s, 4 s on a busy machine)"


def test_an_inherited_section_does_not_hide_the_users_key(tmp_path: Path, capsys) -> None:
    """cram.finetune and fwd_prompt inherit the finetune section: its typo is reported once, at the user's key."""
    config = tmp_path / "typo.yaml"
    config.write_text("finetune: {stepz: 3}\n")
    assert main(["run", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"many: error: {config}: finetune.stepz: unknown key"
