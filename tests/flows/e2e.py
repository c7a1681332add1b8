"""Helpers of the end-to-end tests: the tiny stream of examples/tiny.yaml and `many run --json` called
in-process (the Prefect test harness fixture is in tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from flows.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())


def write_config(path: Path, **changes) -> Path:
    """examples/tiny.yaml with top-level keys replaced by `changes`, written to `path`."""
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def run(capsys, *argv: str) -> dict:
    """`many run --json ARGV` in-process; asserts exit 0 and returns the run summary."""
    capsys.readouterr()
    code = main(["run", "--json", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def computed(summary: dict) -> set[tuple[str, str | None, str | None]]:
    """(stage, task, method) of every stage the run computed (not cached)."""
    return {(s["stage"], s["task"], s["method"]) for s in summary["stages"] if s["status"] == "computed"}


def stored_losses(store, entry: dict) -> dict[str, list]:
    """The `losses` output (many.progress.LossCurve's Parquet) of a run summary's training stage, as columns."""
    import pyarrow as pa

    from many.progress import read_losses

    manifest = store.read_manifest(entry["stage"], entry["key"])
    return read_losses(pa.BufferReader(store.get_bytes(manifest.outputs["losses"].digest, context="test"))).to_pydict()
