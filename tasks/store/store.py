"""The content-addressed artifact store (docs/design.md §3).

    <root>/blobs/sha256/ab/cdef…          immutable content, written once, verified on every read
    <root>/stages/<stage>/<key>.json      manifest, written LAST and create-exclusive
    <root>/runs/<run-id>.json             run summary
    <root>/leases/<id>.json               a run or a deleting gc in progress (tasks.store.lease)

Writes are atomic by construction: blobs first (a blob that exists is not rewritten), the manifest last
with create-exclusive semantics, so a crash leaves at most orphan blobs (invisible to readers, collected
by `gc`) and two writers racing on one key both end up with the winner's manifest. A directory artifact
is a listing blob `{"files": {relpath: {digest, size, kind}}}` of its files' blobs. Every read re-hashes
the bytes and raises `CorruptArtifact` naming the blob and who referenced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, ParamSpec, TypeVar

from botocore.exceptions import BotoCoreError
from pydantic import ValidationError

from tasks.store import lease as leases
from tasks.store.backend import DEFAULT_URL, Backend, one_line, open_backend
from tasks.store.errors import BadName, CorruptArtifact, StoreError
from tasks.store.records import BlobRef, DirListing, GcReport, Lease, LsRow, Manifest, canonical_json, validate_name
from tasks.store.retention import RunInfo, kept_runs

CHUNK_BYTES = 8 * 2**20
GC_MIN_AGE_SECONDS = 3600.0  # an orphan younger than this may belong to a stage still writing its manifest
_BLOB_PATH = re.compile(r"^blobs/sha256/([0-9a-f]{2})/([0-9a-f]{62})$")
_MANIFEST_PATH = re.compile(r"^stages/([A-Za-z0-9._-]+)/([0-9a-f]{64})\.json$")
_RUN_PATH = re.compile(r"^runs/([A-Za-z0-9._-]+)\.json$")
_LEASE_PATH = re.compile(r"^leases/([A-Za-z0-9._-]+)\.json$")
_KEY = re.compile(r"^[0-9a-f]{64}$")

P = ParamSpec("P")
R = TypeVar("R")


def _translated(action: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn I/O failures of a public method into one-line `StoreError`s naming the action and the store."""

    def wrap(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except PermissionError:
                raise StoreError(
                    f"permission denied while {action} in store {args[0]}: check the AWS credentials/profile "
                    "and the bucket policy (or the directory's permissions)"
                ) from None
            except (OSError, BotoCoreError) as error:
                raise StoreError(f"{action} failed in store {args[0]}: {one_line(error)}") from None

        return run

    return wrap


def _name(value: Any) -> str | None:
    """A task or method name from a run summary entry; None for a missing or non-string one."""
    return value if isinstance(value, str) else None


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of a local file, streamed in chunks."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return digest, f.tell()


class Store:
    """A store opened from one URL; holds the fsspec filesystem, the root and a local cache directory."""

    def __init__(self, backend: Backend, cache_dir: Path) -> None:
        self._backend = backend
        self._fs = backend.fs
        self.cache_dir = cache_dir

    @classmethod
    def open(
        cls,
        url: str = DEFAULT_URL,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        cache_dir: str | Path | None = None,
        create: bool = True,
    ) -> Store:
        """Open `s3://bucket/prefix`, `file://path` or a path; materialised artifacts go to `cache_dir`
        (default `$MANY_CACHE_DIR` or `~/.cache/many`). Raises `BadStoreURL` if the store cannot be used.

        `create`: whether a store that does not exist yet may be created (writers: `many run`) or is a
        `StoreNotFound` (a `BadStoreURL`; readers: `many ls`, `report`, `export`, `predict`, and `gc` — a mistyped URL
        is an error, not an empty store); a local root is then never created."""
        backend = open_backend(url, endpoint_url=endpoint_url, region=region, profile=profile, create=create)
        cache = Path(cache_dir or os.environ.get("MANY_CACHE_DIR") or "~/.cache/many").expanduser().absolute()
        return cls(backend, cache)

    @property
    def url(self) -> str:
        return self._backend.url

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __str__(self) -> str:
        return self.url

    # -- paths ---------------------------------------------------------------------------------------

    def _path(self, rel: str) -> str:
        return f"{self._backend.root}/{rel}"

    def _blob_path(self, digest: str) -> str:
        return self._path(f"blobs/sha256/{digest[:2]}/{digest[2:]}")

    def _manifest_rel(self, stage: str, key: str) -> str:
        validate_name("stage", stage)
        if not _KEY.fullmatch(key):
            raise BadName(f"bad cache key {key!r} for stage {stage!r}: expected 64 lowercase hex digits")
        return f"stages/{stage}/{key}.json"

    # -- blobs: writes -------------------------------------------------------------------------------

    def _needs_write(self, digest: str, verify_existing: bool) -> bool:
        path = self._blob_path(digest)
        if not self._backend.exists(path):
            return True
        return verify_existing and self._stored_digest(path) != digest

    @_translated("putting bytes")
    def put_bytes(self, data: bytes, *, verify_existing: bool = False) -> BlobRef:
        """Store `data` as a blob; skipped if the blob exists (and, with `verify_existing`, is intact)."""
        digest = hashlib.sha256(data).hexdigest()
        if self._needs_write(digest, verify_existing):
            self._backend.put_bytes(data, self._blob_path(digest))
        return BlobRef(digest=digest, size=len(data))

    @_translated("putting a file")
    def put_file(self, path: str | Path, *, verify_existing: bool = False, owned: bool = False) -> BlobRef:
        """Hash `path` (streamed), then upload it unless the blob exists (and, with `verify_existing`, is intact).

        `owned`: the caller hands the file over (a stage's output in its work dir, deleted next), so a local store
        may move it in as the blob instead of copying it (the file is then gone from `path`), and the bytes just
        hashed are also the local cache's verified entry of that blob (`_seed`; docs/design.md §3.2)."""
        digest, size = hash_file(Path(path))
        if self._needs_write(digest, verify_existing):
            blob = self._blob_path(digest)
            if owned and self._backend.adopt(Path(path), blob):
                self._seed(digest, blob)
            else:
                self._backend.put_file(Path(path), blob)
        return BlobRef(digest=digest, size=size)

    def _seed(self, digest: str, blob: str) -> None:
        """The blob `blob` is the very file `put_file` just hashed (moved in, same inode): link it into the cache as a
        verified entry, read-only and stamped, as `materialize` would after hashing it again. Nothing if the entry
        exists or the cache is on another filesystem."""
        target = self.cache_dir / "blobs" / digest
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{digest}.tmp-{uuid.uuid4().hex}")
        if not self._backend.link(blob, tmp):
            return
        tmp.chmod(0o444)
        os.replace(tmp, target)
        self._write_stamp(digest, target, {".": digest})

    @_translated("putting a directory")
    def put_dir(self, path: str | Path, *, verify_existing: bool = False, owned: bool = False) -> BlobRef:
        """Store every file under `path` as a blob, then their sorted listing as the directory's blob.

        Symlinked files are stored by content; symlinked directories are not followed; empty directories
        are not kept (a listing holds files only)."""
        root = Path(path)
        files: dict[str, BlobRef] = {}
        for parent, _, names in os.walk(root):
            for name in names:
                file = Path(parent, name)
                files[file.relative_to(root).as_posix()] = self.put_file(file, verify_existing=verify_existing, owned=owned)
        listing = DirListing(files=dict(sorted(files.items())))
        blob = self.put_bytes(canonical_json(listing.model_dump(mode="json")), verify_existing=verify_existing)
        return BlobRef(digest=blob.digest, size=sum(f.size for f in files.values()), kind="dir")

    def put(self, path: str | Path, *, verify_existing: bool = False, owned: bool = False) -> BlobRef:
        """Store a file or a directory artifact (`owned`: see `put_file`)."""
        if Path(path).is_dir():
            return self.put_dir(path, verify_existing=verify_existing, owned=owned)
        if Path(path).is_file():
            return self.put_file(path, verify_existing=verify_existing, owned=owned)
        raise StoreError(f"cannot store {path}: it is neither a file nor a directory")

    # -- blobs: reads (always verified) --------------------------------------------------------------

    def _stored_digest(self, path: str) -> str | None:
        """sha256 of a stored object, streamed; None if it does not exist."""
        digest = hashlib.sha256()
        try:
            with self._fs.open(path, "rb", block_size=CHUNK_BYTES) as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    @_translated("reading a blob")
    def get_bytes(self, digest: str, *, context: str) -> bytes:
        """A small blob's bytes, verified; `context` (stage, key, artifact) goes into any error."""
        try:
            data = self._fs.cat_file(self._blob_path(digest))
        except FileNotFoundError:
            raise CorruptArtifact(f"blob {digest}", context, f"is missing from {self.url}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise CorruptArtifact(f"blob {digest}", context, f"hashes to {actual} in {self.url}")
        return data

    @_translated("reading a blob")
    def get_file(self, digest: str, dest: str | Path, *, context: str, link: bool = False) -> Path:
        """Download a blob to `dest`, verified; `dest` appears only once its bytes are known good.

        With `link`, a local store hard-links the blob at `dest` instead of copying it (where the filesystem allows;
        else it copies) and the verification is the one read of the bytes: `dest` then shares the blob's bytes, so it
        must never be written (materialize's read-only cache)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            try:
                if not (link and self._backend.link(self._blob_path(digest), tmp)):
                    self._fs.get_file(self._blob_path(digest), str(tmp))
            except FileNotFoundError:
                raise CorruptArtifact(f"blob {digest}", context, f"is missing from {self.url}") from None
            actual, _ = hash_file(tmp)
            if actual != digest:
                raise CorruptArtifact(f"blob {digest}", context, f"hashes to {actual} in {self.url}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def read_listing(self, ref: BlobRef, *, context: str) -> DirListing:
        """The verified listing of a directory artifact."""
        data = self.get_bytes(ref.digest, context=context)
        try:
            listing = DirListing.model_validate_json(data)
        except ValidationError:
            raise CorruptArtifact(f"blob {ref.digest}", context, "is not a directory listing") from None
        for rel in listing.files:
            parts = PurePosixPath(rel).parts
            if PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
                raise CorruptArtifact(f"blob {ref.digest}", context, f"lists an unsafe path {rel!r}")
        return listing

    @_translated("materialising an artifact")
    def materialize(self, ref: BlobRef, *, context: str) -> Path:
        """A verified local copy of a file or directory artifact, cached by digest under `cache_dir`.

        Cached copies are read-only (a stage must not edit its inputs) and appear by atomic rename, so
        concurrent workers on one machine share them safely. From a local store on the cache's filesystem they are
        hard links to the blobs (`get_file(link=True)`: one read of the bytes, the verifying hash, and no copy), so
        a blob damaged in place would damage its cached copy too: each cached entry keeps a stamp of its files'
        digest, size, mtime and ctime as verified, and a hit whose stamp no longer matches (any write changes
        ctime) is hashed again — a damaged one leaves the cache and raises `CorruptArtifact`."""
        kind = "blobs" if ref.kind == "file" else "dirs"
        target = self.cache_dir / kind / ref.digest
        if target.exists() and self._cached_intact(ref, target, context):
            return target
        if ref.kind == "file":
            self.get_file(ref.digest, target, context=context, link=True)
            target.chmod(0o444)
            self._write_stamp(ref.digest, target, {".": ref.digest})
            return target
        listing = self.read_listing(ref, context=context)
        staging = target.with_name(f".{ref.digest}.tmp-{uuid.uuid4().hex}")
        try:
            for rel, file in listing.files.items():
                self._cached_file(file.digest, staging / rel, context=f"{context}, file {rel}")
            staging.mkdir(parents=True, exist_ok=True)  # an empty directory artifact
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not a lost race with another worker: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._write_stamp(ref.digest, target, {rel: file.digest for rel, file in listing.files.items()})
        return target

    def _cached_file(self, digest: str, dest: Path, context: str) -> None:
        """A directory entry's file at `dest`, read-only: a link of the cache's verified entry of that blob when its
        stamp still matches (a put of this machine seeded it), else the blob itself, linked or copied and hashed."""
        cached = self.cache_dir / "blobs" / digest
        if self._stamp_matches(digest, cached):
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.link(cached, dest)
                return
        self.get_file(digest, dest, context=context, link=True).chmod(0o444)

    # A cached entry's stamp: {relative path ("." for a file artifact): [digest, size, mtime_ns, ctime_ns]} of each
    # of its files as verified, in cache_dir/stamps/<digest>.json.
    def _stamp_path(self, digest: str) -> Path:
        return self.cache_dir / "stamps" / f"{digest}.json"

    @staticmethod
    def _stat_of(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def _write_stamp(self, digest: str, target: Path, digests: dict[str, str]) -> None:
        path = self._stamp_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({rel: [digest, *self._stat_of(target / rel)] for rel, digest in digests.items()}))
        os.replace(tmp, path)

    def _cached_intact(self, ref: BlobRef, target: Path, context: str) -> bool:
        """Whether the cached entry `target` of `ref` is as verified: its stamp matches every file (a few stats), or
        every file hashes right again (no stamp yet, or a file changed since) and it is stamped anew. A file that
        hashes wrong: the entry and its stamp are removed and `CorruptArtifact` raised. False (fetch it again) when
        the entry lost a file."""
        try:
            if self._stamp_matches(ref.digest, target):
                return True
            if ref.kind == "file":
                digests = {".": ref.digest}
            else:
                digests = {rel: f.digest for rel, f in self.read_listing(ref, context=context).files.items()}
            for rel, digest in digests.items():
                actual, _ = hash_file(target / rel)
                if actual != digest:
                    self._stamp_path(ref.digest).unlink(missing_ok=True)
                    if ref.kind == "file":
                        target.unlink(missing_ok=True)
                    else:
                        shutil.rmtree(target, ignore_errors=True)
                    where = context if ref.kind == "file" else f"{context}, file {rel}"
                    raise CorruptArtifact(f"blob {digest}", where, f"hashes to {actual} in the local cache "
                                          f"{self.cache_dir} (a linked copy of {self.url}'s blob)")
        except FileNotFoundError:
            return False
        self._write_stamp(ref.digest, target, digests)
        return True

    def _stamp_matches(self, digest: str, target: Path) -> bool:
        """Whether the cached entry `target` of blob or listing `digest` is as its stamp recorded it (a few stats)."""
        try:
            stamp = json.loads(self._stamp_path(digest).read_text())
            return bool(stamp) and all(entry[1:] == self._stat_of(target / rel) for rel, entry in stamp.items())
        except (OSError, ValueError, TypeError):
            return False

    @_translated("verifying an artifact")
    def verify(self, ref: BlobRef) -> list[str]:
        """Digests of the artifact's blobs that are missing or corrupt (empty: intact). Reads every byte."""
        if ref.kind == "file":
            return [] if self._stored_digest(self._blob_path(ref.digest)) == ref.digest else [ref.digest]
        try:
            listing = self.read_listing(ref, context="verify")
        except CorruptArtifact:
            return [ref.digest]
        return [f.digest for f in listing.files.values() if self.verify(f)]

    # -- manifests ------------------------------------------------------------------------------------

    @_translated("reading a manifest")
    def read_manifest(self, stage: str, key: str) -> Manifest | None:
        """The manifest of `stage` at `key`, or None if that stage has not completed."""
        rel = self._manifest_rel(stage, key)
        try:
            data = self._fs.cat_file(self._path(rel))
        except FileNotFoundError:
            return None
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError:
            raise CorruptArtifact(f"manifest {rel}", f"stage {stage}, key {key}", "is not a valid manifest") from None
        if (manifest.stage, manifest.key) != (stage, key):
            raise CorruptArtifact(f"manifest {rel}", f"stage {stage}, key {key}", "names another stage or key")
        return manifest

    @_translated("writing a manifest")
    def write_manifest(self, manifest: Manifest) -> Manifest:
        """Create the manifest if absent; if another writer got there first, return the winner's."""
        rel = self._manifest_rel(manifest.stage, manifest.key)
        data = json.dumps(manifest.model_dump(mode="json"), sort_keys=True, indent=2).encode()
        for _ in range(3):  # the winner can vanish only under a concurrent repair; then try again
            if self._backend.create_exclusive(data, self._path(rel)):
                return manifest
            winner = self.read_manifest(manifest.stage, manifest.key)
            if winner is not None:
                return winner
        raise StoreError(f"manifest {rel} in store {self.url} keeps being replaced while writing it; retry the stage")

    @_translated("replacing a manifest")
    def replace_manifest(self, manifest: Manifest) -> Manifest:
        """Repair path: drop the existing manifest of this key, then create-exclusive the new one.

        Between the two steps readers see the stage as not done and may compute it themselves; whoever
        creates first wins and the rest adopt the winner, exactly as in a first-time race."""
        path = self._path(self._manifest_rel(manifest.stage, manifest.key))
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            pass
        return self.write_manifest(manifest)

    @_translated("checking a blob")
    def has_blob(self, digest: str) -> bool:
        """Whether the blob `digest` is stored (its bytes are not read: `verify` checks them)."""
        return bool(self._fs.exists(self._blob_path(digest)))

    @_translated("listing manifests")
    def manifests(self, stage: str) -> list[Manifest]:
        """Every completed manifest of `stage` (those removed since the listing are left out)."""
        return self._manifests(stage)

    def _manifests(self, stage: str | None = None) -> list[Manifest]:
        manifests = []
        root = self._path("stages" if stage is None else f"stages/{validate_name('stage', stage)}")
        if stage is not None and not self._fs.exists(root):
            return []
        for path in sorted(self._fs.find(root)):
            match = _MANIFEST_PATH.fullmatch(self._rel(path))
            if match:
                manifest = self.read_manifest(match[1], match[2])
                if manifest is not None:  # removed since the listing
                    manifests.append(manifest)
        return manifests

    def _rel(self, path: str) -> str:
        return path.removeprefix(f"{self._backend.root}/")

    # -- runs -----------------------------------------------------------------------------------------

    @_translated("writing a run summary")
    def write_run(self, run_id: str, summary: dict[str, Any]) -> None:
        """Write `runs/<run_id>.json`; `summary["stages"]` lists `{"stage", "key", ...}` (docs/design.md §5)."""
        validate_name("run", run_id)
        stages = summary.get("stages")
        if not isinstance(stages, list) or not all(
            isinstance(s, dict) and isinstance(s.get("stage"), str) and isinstance(s.get("key"), str) for s in stages
        ):
            raise ValueError(f"run summary {run_id!r} needs 'stages': a list of objects with string 'stage' and 'key'")
        canonical_json(summary)  # rejects NaN and non-JSON values before anything is written
        self._backend.put_bytes(json.dumps(summary, sort_keys=True, indent=2).encode(), self._path(f"runs/{run_id}.json"))

    @_translated("reading a run summary")
    def read_run(self, run_id: str) -> dict[str, Any]:
        validate_name("run", run_id)
        try:
            return json.loads(self._fs.cat_file(self._path(f"runs/{run_id}.json")))
        except FileNotFoundError:
            raise StoreError(f"no run {run_id!r} in store {self.url}: see `many ls` for what is stored") from None

    # -- ls and gc ------------------------------------------------------------------------------------

    @_translated("listing stages")
    def ls(self) -> list[LsRow]:
        """Every completed stage: name, key, output bytes, age, and the task and method it was computed for (from
        the run summaries: `_labels`); sorted by stage, then creation time."""
        now = datetime.now(timezone.utc)
        manifests = self._manifests()
        labels = self._labels({(m.stage, m.key) for m in manifests})
        rows = [
            LsRow(
                stage=m.stage,
                key=m.key,
                size=sum(o.size for o in m.outputs.values()),
                created=m.created,
                age_seconds=(now - datetime.fromisoformat(m.created)).total_seconds(),
                host=m.host,
                seconds=m.seconds,
                task=labels.get((m.stage, m.key), (None, None))[0],
                method=labels.get((m.stage, m.key), (None, None))[1],
            )
            for m in manifests
        ]
        return sorted(rows, key=lambda r: (r.stage, r.created, r.key))

    def _labels(self, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], tuple[str | None, str | None]]:
        """(stage, key) → (task, method) as the newest run summary that lists the stage names it.

        Manifests do not carry them: a manifest is the content-addressed result, whoever asked for it. The run
        summaries do (`stages: [{stage, key, task, method, …}]`, docs/design.md §5.2); they are read newest first and
        only until every stage in `wanted` has its label. A summary that is not such JSON is skipped (`gc` is the
        command that refuses one)."""
        labels: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        try:
            found = self._fs.find(self._path("runs"), detail=True)
        except FileNotFoundError:
            return labels
        runs = sorted(
            (path for path in found if _RUN_PATH.fullmatch(self._rel(path))),
            key=lambda path: self._backend.modified(found[path]),
            reverse=True,
        )
        for path in runs:
            if wanted <= labels.keys():
                break
            try:
                stages = json.loads(self._fs.cat_file(path)).get("stages")
            except FileNotFoundError:
                continue  # removed since the listing
            except (ValueError, AttributeError):
                continue
            for entry in stages if isinstance(stages, list) else ():
                if not isinstance(entry, dict):
                    continue
                stage, key, task, method = (entry.get(k) for k in ("stage", "key", "task", "method"))
                if isinstance(stage, str) and isinstance(key, str) and (stage, key) in wanted - labels.keys():
                    labels[stage, key] = (_name(task), _name(method))
        return labels

    def _referenced(self, manifests: list[Manifest], recomputable: Mapping[str, Collection[str]] | None = None,
                    spent: set[str] | None = None) -> set[str]:
        """Every blob the manifests keep alive, but for the `spent` digests (superseded recomputable outputs) where
        they are a recomputable output of their stage or an input of a stage with recomputable outputs."""
        referenced: set[str] = set()
        recomputable, spent = recomputable or {}, spent or set()
        for m in manifests:
            for role, artifacts in (("input", m.inputs), ("output", m.outputs)):
                for name, ref in artifacts.items():
                    collectable = m.stage in recomputable and (role == "input" or name in recomputable[m.stage])
                    if collectable and ref.digest in spent:
                        continue
                    referenced.add(ref.digest)
                    if collectable and ref.kind == "dir" and not self.has_blob(ref.digest):
                        continue  # collected by an earlier gc: nothing of it is left to keep
                    if ref.kind == "dir":
                        context = f"stage {m.stage}, key {m.key}, {role} {name}"
                        try:
                            listing = self.read_listing(ref, context=context)
                        except CorruptArtifact as error:
                            raise StoreError(
                                f"gc cannot tell which blobs {context} keeps alive ({error}); nothing was deleted"
                            ) from None
                        referenced.update(f.digest for f in listing.files.values())
        return referenced

    def _run_info(self, rel: str, run_id: str, written: float) -> RunInfo:
        try:
            summary = json.loads(self._fs.cat_file(self._path(rel)))
            stages = frozenset((s["stage"], s["key"]) for s in summary["stages"])
            tasks, fingerprint = summary.get("tasks", []), summary.get("config_fingerprint")
            if not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)) or not isinstance(fingerprint, str | None):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StoreError(
                f"run summary {rel} in store {self.url} is not JSON listing 'stages' with 'stage' and 'key'; "
                "fix or delete it, then rerun gc (nothing was deleted)"
            ) from None
        return RunInfo(run_id, fingerprint, tuple(tasks), stages, written)

    # -- leases ---------------------------------------------------------------------------------------

    @_translated("writing a lease")
    def write_lease(self, lease: Lease) -> None:
        """Write (or renew) `leases/<id>.json`; see `tasks.store.lease`."""
        self._backend.put_bytes(json.dumps(lease.model_dump(mode="json"), sort_keys=True).encode(),
                                self._path(f"leases/{lease.id}.json"))

    @_translated("removing a lease")
    def drop_lease(self, lease_id: str) -> None:
        validate_name("lease", lease_id)
        try:
            self._fs.rm_file(self._path(f"leases/{lease_id}.json"))
        except FileNotFoundError:
            pass

    @_translated("reading leases")
    def leases(self) -> list[Lease]:
        """Every lease in the store, live or not. A file that does not parse counts as a run's lease renewed
        when the file was last written (so it stops gc until it is `LEASE_SECONDS` old, then it is dead)."""
        return [lease for lease, _ in self._lease_files().values()]

    def _lease_files(self) -> dict[str, tuple[Lease, int]]:
        found = {}
        for path, info in sorted(self._find("leases").items()):
            rel = self._rel(path)
            match = _LEASE_PATH.fullmatch(rel)
            if not match:
                continue  # a partial write's temp file; collected with the other partial files
            try:
                lease = Lease.model_validate_json(self._fs.cat_file(path))
            except FileNotFoundError:
                continue  # released since the listing
            except ValidationError:
                written = self._backend.modified(info)
                at = [datetime.fromtimestamp(t, timezone.utc).isoformat() for t in (written, written + leases.LEASE_SECONDS)]
                lease = Lease(id=match[1], kind="run", host="?", pid=0, started=at[0], heartbeat=at[0], expires=at[1])
            found[rel] = (lease, int(info["size"]))
        return found

    def _find(self, area: str) -> dict[str, dict[str, Any]]:
        return self._fs.find(self._path(area), detail=True)

    @_translated("collecting garbage")
    def gc(
        self, *, delete: bool = False, min_age_seconds: float = GC_MIN_AGE_SECONDS, keep_last: int | None = None,
        recomputable: Mapping[str, Collection[str]] | None = None,
    ) -> GcReport:
        """Find what to collect; remove it only if `delete` and no run is in progress (docs/design.md §3.4).

        Always: blobs no surviving manifest references (a referenced directory keeps its files), partial files
        of crashed writes, runs none of whose stages exists, and dead leases. With `keep_last` N (retention):
        also every run that N newer runs of its config supersede (`tasks.store.retention`), and every stage that
        no kept run (nor `runs/latest.json`) lists — superseded merge states, old evals, a crashed run's work —
        and with them the blobs only they referenced. Nothing younger than `min_age_seconds` is removed (a
        writer without a lease may have put blobs whose manifest is still to come), except the summaries of
        runs retention lets go.

        `recomputable` ({stage: output names}, with `keep_last` only): such an output of a kept stage is also
        collected once it is *superseded*: a surviving manifest of the same stage reads it as an input (the next
        link of a chain read it and is done, e.g. merge[t−1]'s state after merge[t]). Its manifest stays (a cached
        rerun reads manifests only); a stage that needs the blob again recomputes its producer (tasks.restore).

        A deleting gc holds a gc lease; if any other lease is live (a run in progress, or another gc), it
        deletes nothing and names them in `in_progress`; a run that starts meanwhile waits for it to finish."""
        if keep_last is not None:
            kept_runs([], keep_last)  # validates it before anything is written
        with leases.hold(self, "gc") if delete else nullcontext() as mine:
            busy = leases.live(self, besides=mine.id if mine else None)
            report = self._collect(min_age_seconds, keep_last, recomputable or {})
            now = datetime.now(timezone.utc)
            if busy:
                return dataclasses.replace(report, in_progress=tuple(b.describe(now) for b in busy))
            if delete:
                # Runs first, then manifests, then blobs: a crash in between never leaves a manifest pointing
                # at a missing blob, only unlisted stages and orphans that the next gc collects.
                for paths in ((*report.dropped_runs, *report.stale_runs), report.superseded,
                              (*report.orphans, *report.expired_leases)):
                    if paths:
                        self._fs.rm([self._path(rel) for rel in paths])
            return dataclasses.replace(report, deleted=delete)

    def _collect(self, min_age_seconds: float, keep_last: int | None,
                 recomputable: Mapping[str, Collection[str]]) -> GcReport:
        now = time.time()
        areas = ("blobs", "stages", "runs", "leases")
        files = {area: {self._rel(path): info for path, info in self._find(area).items()} for area in areas}
        sizes = {rel: int(info["size"]) for area in files.values() for rel, info in area.items()}

        def old(info: dict[str, Any]) -> bool:
            return now - self._backend.modified(info) >= min_age_seconds

        runs: dict[str, RunInfo] = {}
        for rel, info in files["runs"].items():
            if match := _RUN_PATH.fullmatch(rel):
                runs[rel] = self._run_info(rel, match[1], self._backend.modified(info))
        manifests: dict[str, Manifest] = {}
        for rel in files["stages"]:
            if (match := _MANIFEST_PATH.fullmatch(rel)) and (manifest := self.read_manifest(match[1], match[2])):
                manifests[rel] = manifest  # (None: removed since the listing)

        kept: set[str] = set()
        dropped: list[str] = []
        superseded: list[str] = []
        if keep_last is not None:
            latest = runs.get("runs/latest.json")
            kept = kept_runs((r for rel, r in runs.items() if rel != "runs/latest.json"), keep_last)
            dropped = sorted(rel for rel, r in runs.items() if r is not latest and r.run_id not in kept)
            listed = set().union(*(r.stages for r in runs.values() if r.run_id in kept or r is latest))
            superseded = sorted(rel for rel, m in manifests.items()
                                if (m.stage, m.key) not in listed and old(files["stages"][rel]))
        going, dropping = set(superseded), set(dropped)
        surviving = [m for rel, m in manifests.items() if rel not in going]
        spent = _superseded_outputs(surviving, recomputable) if keep_last is not None else {}
        referenced = self._referenced(surviving, recomputable, set(spent))
        done = {(m.stage, m.key) for m in surviving}
        orphans: list[str] = []
        stale_runs: list[str] = []
        for area in areas:
            for rel, info in sorted(files[area].items()):
                if not old(info) or _MANIFEST_PATH.fullmatch(rel) or _LEASE_PATH.fullmatch(rel) or rel in dropping:
                    continue
                blob = _BLOB_PATH.fullmatch(rel)
                if blob and blob[1] + blob[2] in referenced:
                    continue
                if rel in runs:
                    if not runs[rel].stages & done:
                        stale_runs.append(rel)
                    continue
                orphans.append(rel)
        expired = {rel: size for rel, (lease, size) in self._lease_files().items()
                   if not lease.live(datetime.now(timezone.utc))}
        removed = [*superseded, *orphans, *dropped, *stale_runs]
        return GcReport(
            orphans=tuple(orphans),
            orphan_bytes=sum(sizes[rel] for rel in orphans),
            stale_runs=tuple(stale_runs),
            deleted=False,
            keep_last=keep_last,
            superseded=tuple(superseded),
            recomputable=tuple(sorted(spent.values())),
            dropped_runs=tuple(dropped),
            kept_runs=tuple(sorted(r.run_id for r in runs.values() if r.run_id in kept)),
            expired_leases=tuple(expired),
            freed_bytes=sum(sizes[rel] for rel in removed) + sum(expired.values()),
        )


def _superseded_outputs(manifests: list[Manifest], recomputable: Mapping[str, Collection[str]]) -> dict[str, str]:
    """{digest: "stage/key:output"} of the recomputable outputs a manifest of the same stage reads as an input."""
    read_by = {(m.stage, ref.digest) for m in manifests if m.stage in recomputable for ref in m.inputs.values()}
    return {ref.digest: f"{m.stage}/{m.key}:{name}" for m in manifests for name, ref in m.outputs.items()
            if name in recomputable.get(m.stage, ()) and (m.stage, ref.digest) in read_by}
