"""The artifact store (docs/design.md §3, issue #5) against a local directory and a real S3 server (moto)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import pytest

from tasks.store import (
    BadName,
    BadStoreURL,
    BlobRef,
    CorruptArtifact,
    Manifest,
    Store,
    StoreError,
)
from tests.s3 import FAKE_KEY_ID, FAKE_SECRET, REGION, FaultyS3, blob_rel, overwrite, stored_objects

ROOT = Path(__file__).resolve().parents[2]


def make_manifest(key: str, outputs: dict[str, BlobRef], *, stage: str = "finetune", host: str = "h0") -> Manifest:
    return Manifest(
        stage=stage,
        key=key,
        inputs={},
        outputs=outputs,
        config={"lr": 0.002},
        code_version="1",
        seconds=1.5,
        host=host,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(70_000),
        "tokenizer/vocab.json": b'{"a": 1}',
        "tokenizer/deep/empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


KEY_A = "a" * 64


# -- round trips and layout ---------------------------------------------------------------------------


def test_file_round_trip_is_content_addressed(store: Store, store_url: str, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "w.safetensors").write_bytes(data)
    ref = store.put_file(tmp_path / "w.safetensors")
    assert ref == BlobRef(digest=hashlib.sha256(data).hexdigest(), size=len(data), kind="file")
    assert stored_objects(store_url) == {blob_rel(ref.digest): data}
    out = store.get_file(ref.digest, tmp_path / "out" / "copy.bin", context="test")
    assert out.read_bytes() == data
    assert store.get_bytes(store.put_bytes(b"{}").digest, context="test") == b"{}"


def test_directory_round_trip_and_cache(store: Store, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "adapter")
    ref = store.put_dir(tmp_path / "adapter")
    assert ref.kind == "dir" and ref.size == sum(len(d) for d in files.values())
    listing = store.read_listing(ref, context="test")
    assert list(listing.files) == sorted(files)
    local = store.materialize(ref, context="test")
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == files
    assert local.is_relative_to(store.cache_dir)
    assert store.materialize(ref, context="test") == local  # cached by digest
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in local.rglob("*") if p.is_file())  # inputs are read-only
    assert store.put(tmp_path / "adapter") == ref  # same content, same digest
    assert store.verify(ref) == []


def test_identical_content_is_stored_once_and_never_rewritten(store: Store, store_url: str, tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"same bytes")
    (tmp_path / "b.bin").write_bytes(b"same bytes")
    first, second = store.put_file(tmp_path / "a.bin"), store.put_file(tmp_path / "b.bin")
    assert first == second
    assert list(stored_objects(store_url)) == [blob_rel(first.digest)]
    overwrite(store_url, blob_rel(first.digest), b"rotten bytes")
    store.put_file(tmp_path / "a.bin")  # an existing blob is not rewritten ...
    assert stored_objects(store_url)[blob_rel(first.digest)] == b"rotten bytes"
    store.put_file(tmp_path / "a.bin", verify_existing=True)  # ... unless a repair asks for verification
    assert stored_objects(store_url)[blob_rel(first.digest)] == b"same bytes"


def test_an_owned_output_becomes_the_blob_locally_and_is_uploaded_to_s3(store: Store, store_url: str, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "out")
    old = time.time() - 7200
    inodes = {}
    for path in (tmp_path / "out").rglob("*"):
        os.utime(path, (old, old))  # written long before the put: the blob's age must still count from the put
        inodes[path.relative_to(tmp_path / "out").as_posix()] = path.stat().st_ino
    ref = store.put(tmp_path / "out", owned=True)
    listing = store.read_listing(ref, context="test")
    assert {rel: stored_objects(store_url)[blob_rel(f.digest)] for rel, f in listing.files.items()} == files
    local_store = not store_url.startswith("s3://")  # an S3 store uploads, as put_file does
    for rel, file in listing.files.items():
        assert (tmp_path / "out" / rel).exists() is not local_store  # moved in, not copied
        if local_store:
            blob = Path(store.url.removeprefix("file://")) / blob_rel(file.digest)
            assert blob.stat().st_ino == inodes[rel] and blob.stat().st_mtime > time.time() - 600
    with mock.patch("tasks.store.store.hash_file", side_effect=AssertionError("hashed again")) if local_store \
            else contextlib.nullcontext():
        local = store.materialize(ref, context="test")  # locally: the put's hash verified these bytes already
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == files
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    overwrite(store_url, blob_rel(next(iter(listing.files.values())).digest), b"rotten")  # damaged in place ...
    shutil.rmtree(local)
    with pytest.raises(CorruptArtifact):
        store.materialize(ref, context="test")  # ... is caught: the damage changed what the stamp recorded


def test_a_file_not_handed_over_is_copied_into_a_local_store(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    (tmp_path / "user.bin").write_bytes(b"the user's own file")
    ref = store.put_file(tmp_path / "user.bin")
    blob = tmp_path / "store" / blob_rel(ref.digest)
    assert blob.stat().st_ino != (tmp_path / "user.bin").stat().st_ino
    (tmp_path / "user.bin").write_bytes(b"edited later")  # does not touch the stored blob
    assert store.get_bytes(ref.digest, context="test") == b"the user's own file"



def test_a_link_racing_a_writer_of_the_same_blob_retries(tmp_path: Path) -> None:
    """Two owners of one blob put it at once: the second `adopt`s its copy over the first's while the first links
    the blob into its cache. Linux then answers the link ENOENT though the blob and the cache's directory exist (the
    inode it looked up has no name left); that is a retry, not a missing directory (a CI failure of this kind)."""
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    real_link, calls = os.link, []

    def replaced_once(src: str, dest: str) -> None:
        calls.append(src)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory")  # what link() says to a just-replaced source
        real_link(src, dest)

    (tmp_path / "out.bin").write_bytes(b"an output")
    with mock.patch("tasks.store.backend.os.link", side_effect=replaced_once):
        ref = store.put_file(tmp_path / "out.bin", owned=True)
    assert len(calls) == 2
    assert (tmp_path / "cache" / "blobs" / ref.digest).read_bytes() == b"an output"  # seeded on the retry


def test_linking_into_a_missing_directory_names_it(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    ref = store.put_bytes(b"a blob")
    with pytest.raises(OSError, match="cannot link into .*nowhere: no such directory"):
        store._backend.link(store._blob_path(ref.digest), tmp_path / "nowhere" / "file")

# -- manifests: create-exclusive ----------------------------------------------------------------------


def test_manifest_round_trip(store: Store, store_url: str) -> None:
    assert store.read_manifest("finetune", KEY_A) is None
    ref = store.put_bytes(b"adapter")
    manifest = make_manifest(KEY_A, {"adapter": ref})
    assert store.write_manifest(manifest) == manifest
    assert store.read_manifest("finetune", KEY_A) == manifest
    assert json.loads(stored_objects(store_url)[f"stages/finetune/{KEY_A}.json"])["outputs"]["adapter"]["digest"] == ref.digest


def test_manifest_race_between_threads_has_one_winner(store: Store, store_url: str) -> None:
    ref = store.put_bytes(b"adapter")
    results: list[Manifest] = []
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        results.append(store.write_manifest(make_manifest(KEY_A, {"adapter": ref}, host=f"h{i}")))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len({m.host for m in results}) == 1
    assert store.read_manifest("finetune", KEY_A) == results[0]
    assert [rel for rel in stored_objects(store_url) if rel.startswith("stages/")] == [f"stages/finetune/{KEY_A}.json"]


RACER = """
import sys, json
from datetime import datetime, timezone
from tasks.store import Store, Manifest
store = Store.open(sys.argv[1], cache_dir=sys.argv[2])
ref = store.put_bytes(b"adapter")
manifest = Manifest(stage="finetune", key="a" * 64, inputs={}, outputs={"adapter": ref}, config={},
                    code_version="1", seconds=0.0, host=sys.argv[3], created=datetime.now(timezone.utc).isoformat())
print(json.dumps({"winner": store.write_manifest(manifest).host}))
"""


def test_manifest_race_between_processes_has_one_winner(store: Store, store_url: str, tmp_path: Path) -> None:
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, store_url, str(tmp_path / f"cache{i}"), f"proc{i}"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outcomes = [r.communicate(timeout=120) for r in racers]
    assert all(r.returncode == 0 for r in racers), [err for _, err in outcomes]
    winners = {json.loads(out)["winner"] for out, _ in outcomes}
    assert len(winners) == 1
    assert store.read_manifest("finetune", KEY_A).host in winners


# -- corruption ---------------------------------------------------------------------------------------


def flip_byte(data: bytes) -> bytes:
    return data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]


def test_corrupt_blob_is_detected_on_every_read(store: Store, store_url: str, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    ref = store.put_bytes(data)
    overwrite(store_url, blob_rel(ref.digest), flip_byte(data))
    context = f"stage finetune, key {KEY_A}, output adapter"
    for read in (
        lambda: store.get_bytes(ref.digest, context=context),
        lambda: store.get_file(ref.digest, tmp_path / "out.bin", context=context),
        lambda: store.materialize(ref, context=context),
    ):
        with pytest.raises(CorruptArtifact, match=rf"blob {ref.digest} \(stage finetune, key {KEY_A}, output adapter\) hashes to [0-9a-f]{{64}}.*--repair"):
            read()
    assert not (tmp_path / "out.bin").exists()
    assert not (store.cache_dir / "blobs" / ref.digest).exists()
    assert store.verify(ref) == [ref.digest]


def test_corrupt_file_inside_a_directory_names_the_file(store: Store, store_url: str, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "adapter")
    ref = store.put_dir(tmp_path / "adapter")
    bad = store.put_bytes(files["tokenizer/vocab.json"])
    overwrite(store_url, blob_rel(bad.digest), b'{"a": 2}')
    with pytest.raises(CorruptArtifact, match=rf"blob {bad.digest} \(ctx, file tokenizer/vocab.json\) hashes to"):
        store.materialize(ref, context="ctx")
    assert not (store.cache_dir / "dirs" / ref.digest).exists()
    assert store.verify(ref) == [bad.digest]


def test_missing_blob_and_garbage_manifest_are_corrupt_artifacts(store: Store, store_url: str) -> None:
    with pytest.raises(CorruptArtifact, match=rf"blob {'0' * 64} \(ctx\) is missing from"):
        store.get_bytes("0" * 64, context="ctx")
    overwrite(store_url, f"stages/finetune/{KEY_A}.json", b"{not json")
    with pytest.raises(CorruptArtifact, match=rf"manifest stages/finetune/{KEY_A}.json .* is not a valid manifest"):
        store.read_manifest("finetune", KEY_A)


# -- crashes, gc, ls ----------------------------------------------------------------------------------


def test_crash_between_blobs_and_manifest_leaves_only_collectable_orphans(store: Store, store_url: str, tmp_path: Path) -> None:
    make_tree(tmp_path / "kept")
    kept = store.put_dir(tmp_path / "kept")
    store.write_manifest(make_manifest(KEY_A, {"adapter": kept}))
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "half.safetensors").write_bytes(b"written before the crash")
    orphan = store.put_dir(tmp_path / "crashed")  # blobs written, then the "process dies": no manifest
    assert store.read_manifest("finetune", "b" * 64) is None  # invisible to readers
    store.write_run("run-ok", {"stages": [{"stage": "finetune", "key": KEY_A}]})
    store.write_run("run-stale", {"stages": [{"stage": "finetune", "key": "b" * 64}]})
    partial = "blobs/sha256/ab/.cdef.tmp-0f0f"  # a blob upload cut short by the crash
    overwrite(store_url, partial, b"half a blob")

    young = store.gc()  # default grace period: a stage may still be about to write its manifest
    assert young.orphans == () and young.stale_runs == ()
    report = store.gc(min_age_seconds=0)
    orphan_file = store.read_listing(orphan, context="t").files["half.safetensors"].digest
    assert sorted(report.orphans) == sorted([blob_rel(orphan.digest), blob_rel(orphan_file), partial])
    assert report.stale_runs == ("runs/run-stale.json",) and not report.deleted
    before = set(stored_objects(store_url))
    assert store.gc(min_age_seconds=0) == report and set(stored_objects(store_url)) == before  # no flag, no delete
    assert store.gc(min_age_seconds=0, delete=True).deleted
    assert before - set(stored_objects(store_url)) == {*report.orphans, *report.stale_runs}
    assert store.verify(kept) == [] and store.read_run("run-ok")["stages"][0]["key"] == KEY_A
    assert store.gc(min_age_seconds=0) == type(report)(orphans=(), orphan_bytes=0, stale_runs=(), deleted=False)


def test_gc_refuses_to_guess_about_a_malformed_run(store: Store, store_url: str) -> None:
    overwrite(store_url, "runs/r1.json", b"[1, 2]")
    with pytest.raises(StoreError, match=r"run summary runs/r1.json in store .* is not JSON listing 'stages'.*nothing was deleted"):
        store.gc(delete=True, min_age_seconds=0)
    assert "runs/r1.json" in stored_objects(store_url)


def test_ls_lists_stages_keys_sizes_and_ages(store: Store) -> None:
    ref = store.put_bytes(b"x" * 1234)
    store.write_manifest(make_manifest(KEY_A, {"adapter": ref, "projector": store.put_bytes(b"p" * 66)}))
    store.write_manifest(make_manifest("c" * 64, {"grams": ref}, stage="stats"))
    rows = store.ls()
    assert [(r.stage, r.key, r.size, r.host) for r in rows] == [("finetune", KEY_A, 1300, "h0"), ("stats", "c" * 64, 1234, "h0")]
    assert all(0 <= r.age_seconds < 60 for r in rows)


# -- secrets and bad input ----------------------------------------------------------------------------


def test_no_secret_or_endpoint_is_written_or_logged(
    store: Store, store_url: str, s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")  # botocore's own DEBUG log shows the key id in signed headers; never the secret
    make_tree(tmp_path / "adapter")
    ref = store.put_dir(tmp_path / "adapter")
    store.write_manifest(make_manifest(KEY_A, {"adapter": ref}))
    store.write_run("r1", {"stages": [{"stage": "finetune", "key": KEY_A}]})
    written = b"".join(stored_objects(store_url).values()) + repr(store).encode() + str(store.ls()).encode()
    host_port = s3_endpoint.removeprefix("http://")
    for secret in (FAKE_KEY_ID, FAKE_SECRET, host_port, REGION):
        assert secret.encode() not in written
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        ("ftp://host/store", BadStoreURL, r"unsupported store URL scheme 'ftp' in 'ftp://host/store': use s3://bucket/prefix"),
        ("gs://bucket/x", BadStoreURL, r"unsupported store URL scheme 'gs'"),
        ("file://", BadStoreURL, r"store URL 'file://' has no path"),
        ("s3://no-such-bucket-here/p", BadStoreURL, r"bucket 'no-such-bucket-here' does not exist \(store s3://no-such-bucket-here/p\): create it"),
        ("s3://ab/p", BadStoreURL, r"bad bucket name 'ab'"),
        ("s3://Upper/p", BadStoreURL, r"bad bucket name 'Upper'"),
        ("s3://key:secret@bucket/p", BadStoreURL, r"bad bucket name in 's3://\*\*\*@bucket/p': the URL carries credentials"),
        ("s3://bucket/a/../b", BadStoreURL, r"bad prefix 'a/../b'"),
        ("s3://bucket/a//b", BadStoreURL, r"bad prefix 'a//b'"),
    ],
)
def test_bad_store_urls_fail_with_one_clear_line(s3_endpoint: str, url: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as raised:
        Store.open(url)
    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)


def test_s3_options_come_from_arguments_or_the_aws_environment(
    new_bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    store = Store.open(f"s3://{new_bucket}/p", endpoint_url=s3_endpoint, region=REGION, cache_dir=tmp_path)
    assert store.get_bytes(store.put_bytes(b"x").digest, context="t") == b"x"
    with pytest.raises(BadStoreURL, match=rf"^the AWS profile given for store s3://{new_bucket}/p does not exist"):
        Store.open(f"s3://{new_bucket}/p", endpoint_url=s3_endpoint, profile="no-such-profile")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match=rf"^no AWS credentials found for store s3://{new_bucket}/p: set AWS_ACCESS_KEY_ID"):
        Store.open(f"s3://{new_bucket}/p", endpoint_url=s3_endpoint)


def test_store_root_that_is_a_file_is_a_bad_url(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadStoreURL, match=r"store root .*/f is a file, not a directory"):
        Store.open(str(tmp_path / "f"))


def test_a_reader_never_creates_a_store(new_bucket: str, tmp_path: Path) -> None:
    """`create=False` (read-only commands) opens only an existing store: a local root directory, an S3 prefix
    with an object under it; `create=True` (the default, `many run`) makes a new one."""
    from tasks.store import StoreNotFound

    with pytest.raises(StoreNotFound, match=rf"^no store at {tmp_path}/s: {tmp_path}/s does not exist; check --store"):
        Store.open(str(tmp_path / "s"), create=False)
    assert not (tmp_path / "s").exists()
    Store.open(str(tmp_path / "s"))
    assert Store.open(str(tmp_path / "s"), create=False).ls() == []
    with pytest.raises(StoreNotFound, match=rf"^no store at s3://{new_bucket}/p: nothing is stored under that prefix at "
                                             r"endpoint http://127\.0\.0\.1:\d+; check --store"):
        Store.open(f"s3://{new_bucket}/p", create=False)
    Store.open(f"s3://{new_bucket}/p", cache_dir=tmp_path).put_bytes(b"x")
    assert Store.open(f"s3://{new_bucket}/p", create=False).ls() == []
    assert isinstance(StoreNotFound("x"), ValueError)  # exit 2


def test_plain_path_and_file_url_open_the_same_store(tmp_path: Path) -> None:
    by_path = Store.open(str(tmp_path / "s"), cache_dir=tmp_path / "c")
    ref = by_path.put_bytes(b"x")
    by_url = Store.open(f"file://{tmp_path / 's'}", cache_dir=tmp_path / "c")
    assert by_url.url == by_path.url == f"file://{tmp_path / 's'}"
    assert by_url.get_bytes(ref.digest, context="t") == b"x"


@pytest.mark.parametrize(
    ("stage", "key", "message"),
    [
        ("../etc", KEY_A, r"bad stage name '\.\./etc': use only letters, digits"),
        ("a/b", KEY_A, r"bad stage name 'a/b'"),
        ("..", KEY_A, r"bad stage name '\.\.'"),
        ("x..y", KEY_A, r"bad stage name 'x\.\.y'"),
        ("", KEY_A, r"bad stage name ''"),
        ("finetune", "ABC", r"bad cache key 'ABC' for stage 'finetune': expected 64 lowercase hex digits"),
        ("finetune", "../" + "a" * 61, r"bad cache key"),
    ],
)
def test_bad_stage_names_and_keys_are_rejected(store: Store, stage: str, key: str, message: str) -> None:
    with pytest.raises(BadName, match=message):
        store.read_manifest(stage, key)


@pytest.mark.parametrize(
    ("run_id", "summary", "error", "message"),
    [
        ("../r", {"stages": []}, BadName, r"bad run name '\.\./r'"),
        ("r", {"report": {}}, ValueError, r"run summary 'r' needs 'stages'"),
        ("r", {"stages": [{"stage": "x"}]}, ValueError, r"string 'stage' and 'key'"),
        ("r", {"stages": [], "score": float("nan")}, ValueError, r"Out of range float values are not JSON compliant"),
    ],
)
def test_bad_run_summaries_are_rejected(store: Store, run_id: str, summary: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        store.write_run(run_id, summary)


def test_transient_s3_faults_are_retried_counted_and_logged(new_bucket: str, faulty_s3: FaultyS3, caplog) -> None:
    from tasks.store.backend import retries_seen

    store = Store.open(f"s3://{new_bucket}/p", endpoint_url=faulty_s3.endpoint)
    before = retries_seen()
    faulty_s3.fail_next(2, 503, "ServiceUnavailable")
    with caplog.at_level("INFO", logger="many.store"):
        ref = store.put_bytes(b"survives an outage")
        faulty_s3.fail_next(2, 500, "InternalError")
        assert store.get_bytes(ref.digest, context="t") == b"survives an outage"
    assert faulty_s3.faults_left() == 0
    assert retries_seen() - before == 4
    retried = [r.getMessage() for r in caplog.records if r.name == "many.store"]
    assert len(retried) == 4 and "attempt 1 of 4 failed (HTTP 503); retrying" in retried[0], retried
    assert "failed (HTTP 500); retrying" in retried[-1], retried


def test_access_denied_fails_fast_with_one_line(new_bucket: str, faulty_s3: FaultyS3) -> None:
    faulty_s3.fail_next(100, 403, "AccessDenied")
    with pytest.raises(StoreError, match=rf"^access denied to bucket '{new_bucket}' \(store s3://{new_bucket}/p\): check the AWS credentials"):
        Store.open(f"s3://{new_bucket}/p", endpoint_url=faulty_s3.endpoint)
    assert faulty_s3.requests == 1  # a permanent error is not retried
    faulty_s3.fail_next(0, 0, "")  # access granted again; then revoked under an open store
    store = Store.open(f"s3://{new_bucket}/p", endpoint_url=faulty_s3.endpoint)
    faulty_s3.fail_next(100, 403, "AccessDenied")
    with pytest.raises(StoreError, match=r"^permission denied while putting bytes in store s3://.*/p: check the AWS"):
        store.put_bytes(b"x")


@pytest.mark.slow
def test_unreachable_endpoint_is_one_store_error_after_bounded_retries(new_bucket: str) -> None:
    with pytest.raises(StoreError, match=rf"cannot reach bucket '{new_bucket}' \(store s3://{new_bucket}\) at endpoint "
                       r"http://127\.0\.0\.1:9: Could not connect") as raised:
        Store.open(f"s3://{new_bucket}", endpoint_url="http://127.0.0.1:9")
    assert not isinstance(raised.value, ValueError)


def test_cached_copies_are_linked_stamped_and_rechecked_when_changed(
    store: Store, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.store.store as store_module

    data = os.urandom(100_000)
    ref = store.put_bytes(data)
    make_tree(tmp_path / "adapter")
    tree_ref = store.put_dir(tmp_path / "adapter")
    local, tree = store.materialize(ref, context="t"), store.materialize(tree_ref, context="t")
    local_store = store_url.startswith("file://")
    if local_store:  # a hard link to the blob: no byte copied
        blob = Path(store_url.removeprefix("file://"), blob_rel(ref.digest))
        assert local.stat().st_ino == blob.stat().st_ino and local.read_bytes() == data
    hashed: list[Path] = []
    real_hash = store_module.hash_file
    monkeypatch.setattr(store_module, "hash_file", lambda path: hashed.append(path) or real_hash(path))
    assert store.materialize(ref, context="t") == local and store.materialize(tree_ref, context="t") == tree
    assert hashed == []  # an unchanged hit is a few stats, not a hash

    local.chmod(0o644)
    local.write_bytes(flip_byte(data))  # in place: on a local store the blob's own bytes (one inode)
    with pytest.raises(CorruptArtifact, match=rf"blob {ref.digest} \(t\) hashes to .* in the local cache"):
        store.materialize(ref, context="t")
    assert not local.exists()
    assert store.verify(ref) == ([ref.digest] if local_store else [])  # the damage reached the store iff linked

    vocab = tree / "tokenizer" / "vocab.json"
    vocab.chmod(0o644)
    vocab.write_bytes(b'{"a": 2}')
    with pytest.raises(CorruptArtifact, match=r"\(t, file tokenizer/vocab.json\) hashes to"):
        store.materialize(tree_ref, context="t")
    assert not tree.exists()
    if local_store:
        with pytest.raises(CorruptArtifact, match="file tokenizer/vocab.json"):
            store.materialize(tree_ref, context="t")  # fetched again from the store: its blob is the damaged one
    else:
        assert (store.materialize(tree_ref, context="t") / "tokenizer" / "vocab.json").read_bytes() == b'{"a": 1}'

    touched = store.materialize(store.put_bytes(b"intact"), context="t")
    os.utime(touched, ns=(1, 1))  # changed metadata, same bytes: hashed again, kept, stamped anew
    hashed.clear()
    assert store.materialize(store.put_bytes(b"intact"), context="t") == touched and len(hashed) == 1
    hashed.clear()
    store.materialize(store.put_bytes(b"intact"), context="t")
    assert hashed == []
