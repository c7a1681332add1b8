"""Fixtures of the flows tests: a real Prefect test harness per module for the end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    """A Prefect test harness (its own temporary server and database) for one test module."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("MANY_CACHE_DIR", str(tmp_path_factory.mktemp("many-cache")))
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-many-test")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    with prefect_test_harness(server_startup_timeout=90):
        yield
