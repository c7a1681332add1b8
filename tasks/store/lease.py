"""Leases: how a run and a deleting `gc` keep out of each other's way (docs/design.md §3.4).

A `many run` holds `leases/<run-id>.json` (kind "run") from before its first store read until after its run
summary is written; a deleting `gc` holds one of kind "gc" while it decides and deletes. The holder rewrites its
lease every `HEARTBEAT_SECONDS` with `expires` = now + `LEASE_SECONDS`, and removes it when done; a holder that
dies stops renewing, and its lease is dead once `expires` has passed.

The rule is a two-flag handshake. Each side writes its own lease first and only then looks at the other's:
a gc that finds a live run lease deletes nothing; a run that finds a live gc lease waits until it is gone. The
store's listings are read-after-write consistent (a local directory; S3 since 2020), so whichever of the two
writes lands second, the writer that lands second sees the first: a gc and a run never overlap.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Literal, Protocol

from tasks.store.records import Lease


class Store(Protocol):
    """What leases need of a store (tasks.store.store.Store, which calls this module from its gc)."""

    url: str

    def write_lease(self, lease: Lease) -> None: ...
    def drop_lease(self, lease_id: str) -> None: ...
    def leases(self) -> list[Lease]: ...

HEARTBEAT_SECONDS = 30.0
LEASE_SECONDS = 300.0  # ten missed heartbeats: the holder is gone (crashed, killed, its machine lost)
WAIT_POLL_SECONDS = 2.0
log = logging.getLogger("many.store")


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def new_lease(kind: Literal["run", "gc"], lease_id: str | None = None, started: str | None = None) -> Lease:
    """A lease record held by this process, renewed now."""
    now = datetime.now(timezone.utc)
    return Lease(
        id=lease_id or f"{kind}-{uuid.uuid4().hex[:12]}", kind=kind, host=socket.gethostname(), pid=os.getpid(),
        started=started or _iso(now), heartbeat=_iso(now), expires=_iso(now + timedelta(seconds=LEASE_SECONDS)),
    )


@contextmanager
def hold(store: Store, kind: Literal["run", "gc"], lease_id: str | None = None) -> Iterator[Lease]:
    """Hold a lease on `store` for the duration of the block: written before it, renewed by a daemon thread,
    removed after it (also on error). A renewal that fails is logged and tried again at the next heartbeat."""
    lease = new_lease(kind, lease_id)
    store.write_lease(lease)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                store.write_lease(new_lease(kind, lease.id, lease.started))
            except Exception as error:  # noqa: BLE001 - keep renewing; LEASE_SECONDS spans several misses
                log.warning("renewing lease %s in %s failed: %s", lease.id, store.url, error)

    thread = threading.Thread(target=renew, name=f"many-lease-{lease.id}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
        store.drop_lease(lease.id)


def live(store: Store, kind: Literal["run", "gc"] | None = None, *, besides: str | None = None) -> list[Lease]:
    """The live leases of `kind` (any kind when None) on `store`, other than the lease `besides`."""
    now = datetime.now(timezone.utc)
    return [
        lease for lease in store.leases()
        if lease.live(now) and lease.id != besides and (kind is None or lease.kind == kind)
    ]


@contextmanager
def run_lease(store: Store, run_id: str) -> Iterator[Lease]:
    """What a run holds: its lease, and then no live gc lease before the block starts (it waits for each gc
    to finish, or for a dead one's lease to expire)."""
    with hold(store, "run", run_id) as lease:
        said = False
        while busy := live(store, "gc"):
            if not said:
                now = datetime.now(timezone.utc)
                log.warning("run %s waits for %s to finish", run_id, "; ".join(b.describe(now) for b in busy))
                said = True
            time.sleep(WAIT_POLL_SECONDS)
        yield lease
