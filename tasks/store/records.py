"""The store's JSON records (docs/design.md §3): blob references, stage manifests, directory listings,
and the rows of `ls` / the report of `gc`. Names used as path components are validated here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator

from many.config import Frozen
from tasks.store.errors import BadName

Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # sha256, lowercase hex
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


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
    """One cached stage as `many ls` shows it."""

    stage: str
    key: str
    size: int  # bytes of its outputs
    created: str
    age_seconds: float
    host: str
    seconds: float


@dataclass(frozen=True)
class GcReport:
    """What `gc` found (and removed when `deleted`): store-relative paths of orphan files and stale runs.

    Orphans are blobs no manifest references, plus partial files left by crashed writes; a run is stale
    when none of the stage manifests it lists exists any more.
    """

    orphans: tuple[str, ...]
    orphan_bytes: int
    stale_runs: tuple[str, ...]
    deleted: bool
