"""Helpers of the deployment tests: the tiny stream of examples/tiny.yaml as a config dict (the S3 server and
the Prefect harness are the shared fixtures of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def tiny(**changes: Any) -> dict[str, Any]:
    """examples/tiny.yaml as a dict, with top-level keys replaced."""
    return {**yaml.safe_load((EXAMPLES / "tiny.yaml").read_text()), **changes}


def computed(summary: dict) -> set[tuple[str, str | None, str | None]]:
    return {(s["stage"], s["task"], s["method"]) for s in summary["stages"] if s["status"] == "computed"}
