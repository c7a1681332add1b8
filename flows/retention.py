"""What `many gc --keep-last N` needs from each run (docs/design.md §3.4): the config fingerprint its summary
records, which says which runs are "the same config", and the lease it holds while it runs, which keeps a
deleting gc out of its way (tasks.store.lease)."""

from __future__ import annotations

import functools
import hashlib
import inspect
import uuid
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flows.config import RunConfig
from tasks.store import Store, canonical_json
from tasks.store.lease import run_lease

# Not part of a config's identity: the task list (a stream grows, or has a task's data replaced, under one
# config; tasks.store.retention compares the lists itself) and where or how the run happened.
NOT_IDENTITY = frozenset({"tasks", "task_source", "store", "ray", "resources", "retries"})

P = ParamSpec("P")
R = TypeVar("R")


def config_fingerprint(config: RunConfig) -> str:
    """sha256 of the canonical JSON of the run config without the sections in `NOT_IDENTITY`."""
    return hashlib.sha256(canonical_json(config.model_dump(mode="json", exclude=set(NOT_IDENTITY)))).hexdigest()


def leased(flow: Callable[P, R]) -> Callable[P, R]:
    """Run `flow(config, run_id=…, …)` holding a run lease on the config's store: from before it reads the
    store until after it has written its summary, and released however it ends."""

    signature = inspect.signature(flow)

    @functools.wraps(flow)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        given = signature.bind(*args, **kwargs).arguments
        s = given["config"].store
        store = Store.open(s.url, endpoint_url=s.endpoint_url, region=s.region, profile=s.profile)
        with run_lease(store, given.get("run_id") or f"run-{uuid.uuid4().hex[:12]}"):
            return flow(*args, **kwargs)

    return run
