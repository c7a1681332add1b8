"""Stages and the stage cache (docs/design.md §2 "Cache key", §3): the cache logic every stage shares.

A stage's cache key is the sha256 of the canonical JSON (sorted keys, no whitespace, shortest round-trip
floats, see `canonical_json`) of

    {"stage": name, "version": code version, "config": the sub-config the stage reads, "inputs": {name: digest}}

It depends only on those values — never on in-memory tensors, source text, paths, hosts or time — so it
is the same in every process and on every machine, and any change of config, code version or input
content gives a new key. A stage is done iff its manifest `stages/<name>/<key>.json` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from tasks.store import BlobRef, CorruptArtifact, Manifest, Store, StoreError, canonical_json, validate_name

Config = BaseModel | Mapping[str, Any]
Compute = Callable[[dict[str, Path], Path], Mapping[str, Path]]


@dataclass(frozen=True)
class Stage:
    """What a stage is: its name, the version of its code (bump it when results would change), and the
    names of the artifacts it reads and writes."""

    name: str
    version: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        validate_name("stage", self.name)
        if not isinstance(self.version, str) or not self.version:
            raise ValueError(f"stage {self.name!r} needs a non-empty code version string, got {self.version!r}")
        for role, names in (("input", self.inputs), ("output", self.outputs)):
            if not isinstance(names, tuple):
                raise ValueError(f"stage {self.name!r}: {role}s must be a tuple of names, got {names!r}")
            for name in names:
                validate_name(f"{role} artifact", name)
            if len(set(names)) != len(names):
                raise ValueError(f"stage {self.name!r} lists an {role} name twice: {names}")
        if not self.outputs:
            raise ValueError(f"stage {self.name!r} declares no outputs: a stage must produce at least one artifact")


@dataclass(frozen=True)
class StageResult:
    """`computed` also when this process computed but another writer's manifest won the race."""

    status: Literal["computed", "cached"]
    manifest: Manifest


def config_json(stage: Stage, config: Config) -> dict[str, Any]:
    """The sub-config as plain JSON values (a pydantic model is dumped in JSON mode)."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    try:
        return json.loads(canonical_json(data))
    except (TypeError, ValueError) as error:
        raise ValueError(f"config of stage {stage.name!r} is not plain JSON ({error}): use str/int/float/bool/list/dict") from None


def _check_inputs(stage: Stage, inputs: Mapping[str, BlobRef]) -> None:
    if set(inputs) != set(stage.inputs):
        raise ValueError(f"stage {stage.name!r} expects inputs {sorted(stage.inputs)}, got {sorted(inputs)}")
    for name, ref in inputs.items():
        if not isinstance(ref, BlobRef):
            raise ValueError(f"input {name!r} of stage {stage.name!r} must be a BlobRef (from Store.put or a manifest), got {ref!r}")


def cache_key(stage: Stage, config: Config, inputs: Mapping[str, BlobRef]) -> str:
    """sha256 hex of canonical JSON {stage, version, config, inputs: {name: digest}} (see module doc)."""
    _check_inputs(stage, inputs)
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "config": config_json(stage, config),
        "inputs": {name: ref.digest for name, ref in inputs.items()},
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def lookup(store: Store, stage: Stage, config: Config, inputs: Mapping[str, BlobRef]) -> Manifest | None:
    """The cached manifest for these inputs and config, or None; computes nothing."""
    return store.read_manifest(stage.name, cache_key(stage, config, inputs))


def intact(store: Store, manifest: Manifest, collectable: Collection[str] = ()) -> bool:
    """Whether every output blob of `manifest` exists and hashes to its digest (reads every byte). An output named
    in `collectable` may be absent (gc collected it as superseded: tasks.restore recomputes it when needed)."""
    return not any(store.verify(ref) for name, ref in manifest.outputs.items()
                   if not (name in collectable and not store.has_blob(ref.digest)))


FAULT_AFTER_BLOBS = "MANY_FAULT_AFTER_BLOBS"


def _crash_point(stage: str, key: str) -> None:
    """Test hook, off unless `MANY_FAULT_AFTER_BLOBS=<stage name or cache key>`: kill -9 the whole `many run`
    after that stage's blobs are stored and before its manifest — the crash window timing cannot hit
    (tests/reliability/test_kill.py). Only for a `many run` started as a session leader (`setsid`): it kills
    the session leader's process group (the driver, Ray's raylet and GCS), then its own (a Ray worker has one)."""
    if os.environ.get(FAULT_AFTER_BLOBS) in (stage, key):
        os.killpg(os.getsid(0), signal.SIGKILL)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def run_stage(
    store: Store,
    stage: Stage,
    config: Config,
    inputs: Mapping[str, BlobRef],
    compute: Compute,
    *,
    host: str | None = None,
    repair: bool = False,
) -> StageResult:
    """Return the cached manifest, or materialise the inputs, run `compute(local_inputs, workdir)` in a
    fresh directory, store each returned output path (file or directory) and write the manifest last.

    `host` (hostname or Ray node id; default this hostname) is recorded in the manifest.
    With `repair`, a cached stage is verified (every output byte re-hashed); if any blob is missing or
    corrupt — or the manifest itself is unreadable — the stage is recomputed, its outputs are re-put with
    `verify_existing` (so corrupt blobs are overwritten rather than deduplicated against), and the
    manifest is replaced: deleted, then created exclusively. Concurrent repairs converge like a first
    write: one creates, the others adopt its manifest.
    """
    key = cache_key(stage, config, inputs)
    try:
        cached = store.read_manifest(stage.name, key)
    except CorruptArtifact:
        if not repair:
            raise
        cached = None
        broken = True
    else:
        broken = cached is not None and repair and not intact(store, cached)
    if cached is not None and not broken:
        return StageResult("cached", cached)

    local_inputs = {
        name: store.materialize(ref, context=f"stage {stage.name}, key {key}, input {name}")
        for name, ref in inputs.items()
    }
    work_root = store.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{stage.name}-", dir=work_root) as workdir:
        started = time.monotonic()
        produced = compute(local_inputs, Path(workdir))
        seconds = time.monotonic() - started
        if not isinstance(produced, Mapping) or set(produced) != set(stage.outputs):
            got = sorted(produced) if isinstance(produced, Mapping) else repr(produced)
            raise StoreError(f"stage {stage.name!r} returned outputs {got}, expected {sorted(stage.outputs)}: fix its compute function")
        # the work dir is the stage's own and is deleted next: a local store moves its files in instead of copying
        outputs = {name: store.put(Path(produced[name]), verify_existing=broken, owned=True) for name in stage.outputs}
    _crash_point(stage.name, key)
    manifest = Manifest(
        stage=stage.name,
        key=key,
        inputs=dict(inputs),
        outputs=outputs,
        config=config_json(stage, config),
        code_version=stage.version,
        seconds=round(seconds, 3),
        host=host or socket.gethostname(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    written = store.replace_manifest(manifest) if broken else store.write_manifest(manifest)
    return StageResult("computed", written)
