"""Fixtures for the store and stage tests: a `store` parametrized over a local directory and an S3 bucket on
the moto server of tests/s3.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.store import Store


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same suite runs against `file://<tmp>` and `s3://<bucket>/<prefix>` on moto."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    bucket = request.getfixturevalue("new_bucket")
    return f"s3://{bucket}/many/store"


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Store:
    return Store.open(store_url, cache_dir=tmp_path / "cache")
