"""The store's JSON records (docs/design.md §3): blob references, stage manifests, directory listings,
leases, and the rows of `ls` / the report of `gc`. Names used as path components are validated here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator

from many.config import Frozen
from tasks.store.errors import BadName

Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # sha256, lowercase hex
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_BLOB = re.compile(r"^blobs/sha256/[0-9a-f]{2}/[0-9a-f]{62}$")


def validate_name(kind: str, name: str) -> str:
    """A stage/run/output name becomes a path component: `[A-Za-z0-9._-]+`, not `.`, no `..`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or name == ".":
        raise BadName(
            f"bad {kind} name {name!r}: use only letters, digits, '.', '_' and '-' (no '..', no slashes)"
        )
    return name


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8, no NaN/Infinity.

    Floats use Python's shortest round-trip repr, identical on every machine and process, so equal
    values give equal bytes; `1` and `1.0` stay distinct (typed configs fix each field's type).
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class BlobRef(Frozen):
    """A stored artifact: a file blob, or a directory stored as a listing blob of its files' blobs.

    For a directory, `digest` is the listing blob's digest and `size` the total of its files' sizes.
    """

    digest: Digest
    size: int = Field(ge=0)
    kind: Literal["file", "dir"] = "file"


class DirListing(Frozen):
    """The content of a directory blob: relative POSIX path -> file blob (kind "file")."""

    files: dict[str, BlobRef]


class Manifest(Frozen):
    """`stages/<stage>/<key>.json`: a stage is done iff this exists; written last, create-exclusive.

    `inputs` carry kind and size as well as the digest (the cache key uses digests only), so a manifest
    alone says which blobs it keeps alive — `gc` relies on that for directory inputs.
    """

    stage: str
    key: Digest
    inputs: dict[str, BlobRef]
    outputs: dict[str, BlobRef]
    config: dict[str, Any]
    code_version: str
    seconds: float = Field(ge=0)
    host: str
    created: str  # UTC ISO 8601

    @field_validator("stage")
    @classmethod
    def _stage_name(cls, stage: str) -> str:
        return validate_name("stage", stage)

    @field_validator("inputs", "outputs")
    @classmethod
    def _artifact_names(cls, artifacts: dict[str, BlobRef]) -> dict[str, BlobRef]:
        for name in artifacts:
            validate_name("artifact", name)
        return artifacts


@dataclass(frozen=True)
class LsRow:
    """One cached stage as `many ls` shows it. `task` and `method` are what the newest run summary listing the stage
    calls it (a manifest is keyed by content, not by who asked for it); None for the shared ones (`base` has no task,
    per-task stages no method) and for a stage no finished run lists yet."""

    stage: str
    key: str
    size: int  # bytes of its outputs
    created: str
    age_seconds: float
    host: str
    seconds: float
    task: str | None = None
    method: str | None = None


class Lease(Frozen):
    """`leases/<id>.json`: a `many run` (kind "run") or a deleting `gc` (kind "gc") in progress (docs/design.md §3.4).

    The holder rewrites it every heartbeat with a later `expires`; it is live until then. Times are UTC ISO 8601."""

    id: str
    kind: Literal["run", "gc"]
    host: str
    pid: int
    started: str
    heartbeat: str
    expires: str

    @field_validator("id")
    @classmethod
    def _lease_name(cls, lease_id: str) -> str:
        return validate_name("lease", lease_id)

    def live(self, now: datetime) -> bool:
        return datetime.fromisoformat(self.expires) > now

    def describe(self, now: datetime) -> str:
        """`run 20250101T…-ab12cd on host h (pid 7), heartbeat 12 s ago`: what an operator needs to find it."""
        ago = (now - datetime.fromisoformat(self.heartbeat)).total_seconds()
        return f"{self.kind} {self.id} on host {self.host} (pid {self.pid}), heartbeat {ago:.0f} s ago"


@dataclass(frozen=True)
class GcReport:
    """What `gc` found (and removed when `deleted`): store-relative paths.

    Orphans are blobs no surviving manifest references, plus partial files left by crashed writes; a run is
    stale when none of the stage manifests it lists exists any more. With retention (`keep_last`), `superseded`
    are the manifests of stages no kept run lists and `dropped_runs` the run summaries retention let go
    (`kept_runs`: the run ids it kept), `recomputable` the outputs of kept stages whose blobs go because the next
    link of their chain read them (`Store.gc`'s `recomputable`). `in_progress` names the live leases that made gc delete nothing.
    `freed_bytes` counts every file removed (or that would be): blobs, partial files, manifests, runs, leases.
    """

    orphans: tuple[str, ...]
    orphan_bytes: int
    stale_runs: tuple[str, ...]
    deleted: bool
    keep_last: int | None = None
    superseded: tuple[str, ...] = ()
    recomputable: tuple[str, ...] = ()  # "stage/key:output" whose blobs go (superseded recomputable outputs)
    dropped_runs: tuple[str, ...] = ()
    kept_runs: tuple[str, ...] = ()
    expired_leases: tuple[str, ...] = ()
    in_progress: tuple[str, ...] = ()
    freed_bytes: int = 0

    @property
    def blobs(self) -> tuple[str, ...]:
        return tuple(p for p in self.orphans if _BLOB.fullmatch(p))

    @property
    def partial_files(self) -> tuple[str, ...]:
        return tuple(p for p in self.orphans if not _BLOB.fullmatch(p))

    @property
    def removed(self) -> tuple[str, ...]:
        """Every path removed (or that would be), runs last."""
        return (*self.superseded, *self.orphans, *self.expired_leases, *self.dropped_runs, *self.stale_runs)

    def as_json(self) -> dict[str, Any]:
        """`many gc --json` (docs/design.md §5.2)."""
        return {
            "deleted": self.deleted,
            "keep_last": self.keep_last,
            "in_progress": list(self.in_progress),
            "bytes_freed": self.freed_bytes,
            "counts": {"stages": len(self.superseded), "blobs": len(self.blobs), "partial_files": len(self.partial_files),
                       "runs": len(self.dropped_runs) + len(self.stale_runs), "leases": len(self.expired_leases),
                       "outputs": len(self.recomputable)},
            "runs_kept": list(self.kept_runs),
            "removed": {"stages": list(self.superseded), "blobs": list(self.blobs), "partial_files": list(self.partial_files),
                        "runs": [*self.dropped_runs, *self.stale_runs], "leases": list(self.expired_leases),
                        "outputs": list(self.recomputable)},
        }
