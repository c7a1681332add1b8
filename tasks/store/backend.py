"""Where the store's bytes live (docs/design.md §3): a local directory or an S3 prefix, behind fsspec.

The two backends differ only in how a write is made atomic and exclusive:

- local: write a hidden temp file next to the target, then `os.replace` (atomic overwrite) or
  `os.link` (atomic create-exclusive: fails if the target exists); a crash leaves only a temp file,
  which `gc` collects.
- S3: an object appears only when its upload completes, so a plain put is atomic; create-exclusive is
  a conditional put (`If-None-Match: *`), which S3 answers with 412 when the key exists.

Credentials come only from the standard AWS chain (environment, profile, instance role); the endpoint
from the argument or `AWS_ENDPOINT_URL(_S3)`. None of them is kept in `url`, which is what the store
writes and logs. Error messages may name the endpoint (a store that cannot be reached says where it tried),
never a secret: every URL in them goes through `tasks.redact.redact` (no userinfo, no query string).

`create=False` opens only a store that exists — a local root directory, or an S3 prefix holding at least one
object — and raises `StoreNotFound` otherwise: commands that do not compute (`many ls`, `report`, `export`,
`predict`, `gc`) must not
create a store at a mistyped URL and then report it empty.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import s3fs
from botocore.exceptions import BotoCoreError, NoCredentialsError, ProfileNotFound
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from tasks.redact import redact
from tasks.store.errors import BadStoreURL, StoreError, StoreNotFound, StoreUnreachable

DEFAULT_URL = "./many-store"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._=+-]+$")
# botocore retries 5xx, throttling and connection errors with jittered exponential backoff, bounded;
# 4xx other than throttling (403 AccessDenied, 404 NoSuchBucket) are never retried. s3fs wraps each call
# in its own loop (also for a body cut mid-stream); 2 rounds of 4 attempts bound an outage to ~10 s.
S3_ATTEMPTS = 4  # per request, the first included
S3FS_ROUNDS = 2
S3_TIMEOUTS_SECONDS = {"connect_timeout": 5, "read_timeout": 60}
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_LINK_TRIES = 5  # link attempts while a concurrent writer keeps replacing the source (`LocalBackend.link`)
log = logging.getLogger("many.store")
_retries = 0
_retries_lock = threading.Lock()


def retries_seen() -> int:
    """S3 requests this process has retried so far (botocore's attempts after a transient failure)."""
    return _retries


def _count_retry(attempts: int, operation: Any, response: Any = None, caught_exception: Any = None, **_: Any) -> None:
    """botocore `needs-retry` hook: count and log an attempt that botocore's standard mode will retry.

    Standard mode retries connection errors, 5xx answers and throttling until `max_attempts`; this hook mirrors
    that rule to tell a retried attempt from a final one (it returns None, so botocore's decision stands)."""
    global _retries
    if attempts >= S3_ATTEMPTS:
        return
    if caught_exception is not None:
        why = type(caught_exception).__name__
    else:
        status = (response[1] if response else {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status not in _RETRYABLE_STATUS:
            return
        why = f"HTTP {status}"
    with _retries_lock:
        _retries += 1
    log.info("S3 %s attempt %d of %d failed (%s); retrying", operation.name, attempts, S3_ATTEMPTS, why)


class Backend(Protocol):
    fs: AbstractFileSystem
    root: str  # fsspec path of the store root, no trailing slash
    url: str  # the store's URL, free of endpoint and credentials

    def exists(self, path: str) -> bool: ...
    def put_file(self, src: Path, dest: str) -> None: ...
    def adopt(self, src: Path, dest: str) -> bool: ...
    def put_bytes(self, data: bytes, dest: str) -> None: ...
    def create_exclusive(self, data: bytes, dest: str) -> bool: ...
    def link(self, src: str, dest: Path) -> bool: ...
    def modified(self, info: dict[str, Any]) -> float: ...


@dataclass
class LocalBackend:
    fs: LocalFileSystem
    root: str
    url: str

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def put_file(self, src: Path, dest: str) -> None:
        tmp = _temp_beside(dest)
        self.fs.put_file(str(src), tmp)
        os.replace(tmp, dest)

    def adopt(self, src: Path, dest: str) -> bool:
        """Move the file `src`, handed over by its writer, to be the stored object `dest` (a rename: no byte copied;
        `src` is gone after), its mtime set to now (gc's age of an unreferenced blob counts from its put). False
        where the filesystem will not rename there (another device): `src` stays, and the caller copies."""
        tmp = _temp_beside(dest)
        try:
            os.rename(src, tmp)
        except OSError:
            return False
        os.utime(tmp)
        os.replace(tmp, dest)
        return True

    def put_bytes(self, data: bytes, dest: str) -> None:
        tmp = _temp_beside(dest)
        Path(tmp).write_bytes(data)
        os.replace(tmp, dest)

    def link(self, src: str, dest: Path) -> bool:
        """Hard-link the stored object `src` at the local path `dest` (no byte copied); False where the filesystem
        will not (another device, links not allowed), and the caller copies. FileNotFoundError if `src` is missing.

        Linux answers ENOENT also when `src` exists but its name was replaced between the lookup and the link (a
        concurrent writer of the same blob `adopt`s its own copy over it: the old inode has no name left to link);
        that case retries, and links the file now there, which holds the same bytes."""
        for _ in range(_LINK_TRIES):
            try:
                os.link(src, dest)
                return True
            except FileNotFoundError:
                if not dest.parent.is_dir():  # the caller's bug, not a missing blob
                    raise OSError(f"cannot link into {dest.parent}: no such directory") from None
                if not os.path.exists(src):
                    raise
            except OSError:  # EXDEV, EPERM (protected_hardlinks), EMLINK, a filesystem without links
                return False
        return False  # replaced on every try: the caller copies

    def create_exclusive(self, data: bytes, dest: str) -> bool:
        tmp = _temp_beside(dest)
        Path(tmp).write_bytes(data)
        try:
            os.link(tmp, dest)  # atomic and exclusive: readers never see a partial manifest
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def modified(self, info: dict[str, Any]) -> float:
        return float(info["mtime"])


@dataclass
class S3Backend:
    fs: s3fs.S3FileSystem
    root: str
    url: str

    def exists(self, path: str) -> bool:
        """One HEAD request (fsspec's `exists` would also list the key as a directory prefix)."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("head_object", Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            return False

    def put_file(self, src: Path, dest: str) -> None:
        self.fs.put_file(str(src), dest)

    def adopt(self, src: Path, dest: str) -> bool:
        return False  # an object store cannot link: the caller uploads

    def put_bytes(self, data: bytes, dest: str) -> None:
        self.fs.pipe_file(dest, data)

    def link(self, src: str, dest: Path) -> bool:
        return False  # an object store has nothing to link: the caller downloads

    def create_exclusive(self, data: bytes, dest: str) -> bool:
        try:
            self.fs.pipe_file(dest, data, mode="create")
            return True
        except FileExistsError:
            return False

    def modified(self, info: dict[str, Any]) -> float:
        modified: datetime = info["LastModified"]
        return modified.timestamp()


def _temp_beside(dest: str) -> str:
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")


def open_backend(
    url: str, *, endpoint_url: str | None = None, region: str | None = None, profile: str | None = None,
    create: bool = True,
) -> Backend:
    """Parse `url` (`s3://bucket/prefix`, `file://path` or a plain path) and connect; fail fast if unusable.
    With `create=False` a store that does not exist yet (no local root; nothing under the S3 prefix) is a
    `StoreNotFound` (a `BadStoreURL`), and nothing is created."""
    if url.startswith("s3://"):
        return _open_s3(url, endpoint_url=endpoint_url, region=region, profile=profile, create=create)
    if url.startswith("file://"):
        return _open_local(url.removeprefix("file://"), url, create)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise BadStoreURL(
            f"unsupported store URL scheme {scheme!r} in {redact(url)!r}: use s3://bucket/prefix, file://path or a path"
        )
    return _open_local(url, url, create)


def _no_store(url: str, why: str) -> StoreNotFound:
    return StoreNotFound(f"no store at {url}: {why}; check --store (or the config's store.url)")


def _open_local(path: str, url: str, create: bool = True) -> LocalBackend:
    if not path:
        raise BadStoreURL(f"store URL {url!r} has no path: use file:///abs/path or a relative path")
    root = Path(path).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise BadStoreURL(f"store root {root} is a file, not a directory: point --store at a directory")
    if not create and not root.exists():
        raise _no_store(url, f"{root} does not exist")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadStoreURL(f"cannot create store root {root}: {error.strerror}") from None
    return LocalBackend(LocalFileSystem(), root.as_posix(), f"file://{root.as_posix()}")


def _open_s3(url: str, *, endpoint_url: str | None, region: str | None, profile: str | None, create: bool = True) -> S3Backend:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    segments = [s for s in prefix.split("/") if s] if prefix else []
    if "@" in bucket:
        raise BadStoreURL(
            f"bad bucket name in {redact(url)!r}: the URL carries credentials; give them through the AWS environment, "
            "a profile or a role, never in the store URL"
        )
    if not _BUCKET.fullmatch(bucket):
        raise BadStoreURL(f"bad bucket name {bucket!r} in {url!r}: 3-63 lowercase letters, digits, '.' or '-'")
    bad = [s for s in segments if not _SEGMENT.fullmatch(s) or s in (".", "..")]
    if bad or "//" in prefix.strip("/"):
        raise BadStoreURL(f"bad prefix {prefix!r} in {url!r}: segments of letters, digits, '._=+-', no '..' or empty segments")
    root = "/".join([bucket, *segments])
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"endpoint {redact(endpoint)}" if endpoint else "the AWS default endpoint"
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint,
        profile=profile,
        client_kwargs={"region_name": region} if region else None,
        config_kwargs={"retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"}, **S3_TIMEOUTS_SECONDS},
        skip_instance_cache=True,  # a store must not share a client (and its credentials) with another
        use_listings_cache=False,  # other writers change the bucket under us; never answer from a stale listing
    )
    fs.retries = S3FS_ROUNDS
    clean_url = f"s3://{root}"
    try:
        fs.s3.meta.events.register("needs-retry.s3", _count_retry)  # creates the client (no request yet)
        fs.call_s3("head_bucket", Bucket=bucket)
        listed = None if create else fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1,
                                                Prefix="".join(f"{s}/" for s in segments))
        if listed is not None and not listed.get("KeyCount"):
            raise _no_store(clean_url, f"nothing is stored under that prefix at {where}")
    except FileNotFoundError:
        raise BadStoreURL(f"bucket {bucket!r} does not exist (store {clean_url}): create it or fix --store") from None
    except PermissionError:
        raise StoreError(
            f"access denied to bucket {bucket!r} (store {clean_url}): check the AWS credentials/profile and the bucket policy"
        ) from None
    except ProfileNotFound:
        raise BadStoreURL(f"the AWS profile given for store {clean_url} does not exist: fix the profile name or ~/.aws/config") from None
    except NoCredentialsError:
        raise StoreError(
            f"no AWS credentials found for store {clean_url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or a role"
        ) from None
    except (OSError, BotoCoreError) as error:  # after the bounded retries: a wrong endpoint or no network
        raise StoreUnreachable(
            f"cannot reach bucket {bucket!r} (store {clean_url}) at {where}: {one_line(error)}; check "
            "store.endpoint_url / AWS_ENDPOINT_URL and the network"
        ) from None
    return S3Backend(fs, root, clean_url)


def one_line(error: BaseException) -> str:
    """An exception as one line, every URL in it without userinfo or query string (tasks.redact): messages end up
    in logs and on terminals; the endpoint's scheme, host and port stay, to say where a request went."""
    return redact(" ".join(str(error).split())) or type(error).__name__
