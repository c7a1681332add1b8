"""Fixtures of the deployment tests: the moto S3 server of the store tests (reused, not copied), a real
Prefect test harness, and the tiny stream of examples/tiny.yaml as a config dict."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tasks.conftest import new_bucket, s3_endpoint  # noqa: F401 - fixtures re-exported for tests/deploy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real Prefect API (ephemeral server on SQLite) for the module, and private caches for Ray/HF."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("MANY_CACHE_DIR", str(tmp_path_factory.mktemp("many-cache")))
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-many-test")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    with prefect_test_harness(server_startup_timeout=90):
        yield


def tiny(**changes: Any) -> dict[str, Any]:
    """examples/tiny.yaml as a dict, with top-level keys replaced."""
    return {**yaml.safe_load((EXAMPLES / "tiny.yaml").read_text()), **changes}


def computed(summary: dict) -> set[tuple[str, str | None, str | None]]:
    return {(s["stage"], s["task"], s["method"]) for s in summary["stages"] if s["status"] == "computed"}
