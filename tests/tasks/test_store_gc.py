"""Retention and gc safety (docs/design.md §3.4, issue #15) against a local directory and a real S3 server (moto):
`gc(keep_last=N)` removes the stages no kept run lists and the blobs only they referenced, keeps everything a
kept run's stages read or wrote, reports the bytes it frees; a live run lease makes a deleting gc delete
nothing, and a run waits for a deleting gc; the retention rule itself on run records."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tasks.store import BadStoreURL, BlobRef, Manifest, Store
from tasks.store import lease as leases
from tasks.store.retention import RunInfo, kept_runs
from tests.s3 import blob_rel, overwrite, stored_objects

F, G = "f" * 64, "0" * 64  # two config fingerprints


class Stages:
    """Writes stages the way tasks.stage.run_stage does: output blobs, then the manifest."""

    def __init__(self, store: Store, tmp: Path) -> None:
        self.store, self.tmp, self.count = store, tmp, 0

    def add(self, stage: str, outputs: dict[str, bytes | dict[str, bytes]], **inputs: Manifest) -> Manifest:
        self.count += 1
        refs = {}
        for name, content in outputs.items():
            if isinstance(content, dict):
                root = self.tmp / f"out{self.count}-{name}"
                for rel, data in content.items():
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / rel).write_bytes(data)
                refs[name] = self.store.put_dir(root)
            else:
                refs[name] = self.store.put_bytes(content)
        manifest = Manifest(
            stage=stage, key=f"{self.count:064x}",
            inputs={name: next(iter(m.outputs.values())) for name, m in inputs.items()}, outputs=refs,
            config={}, code_version="1", seconds=0.0, host="h", created=datetime.now(timezone.utc).isoformat(),
        )
        return self.store.write_manifest(manifest)


def write_run(store: Store, run_id: str, stages: list[Manifest], tasks: list[str], fingerprint: str | None = F,
              latest: bool = False) -> None:
    summary = {"run_id": run_id, "tasks": tasks, "stages": [{"stage": m.stage, "key": m.key} for m in stages]}
    if fingerprint is not None:
        summary["config_fingerprint"] = fingerprint
    for name in (run_id, "latest") if latest else (run_id,):
        store.write_run(name, summary)


def manifest_rel(m: Manifest) -> str:
    return f"stages/{m.stage}/{m.key}.json"


def blobs_of(store: Store, ref: BlobRef) -> set[str]:
    files = store.read_listing(ref, context="t").files.values() if ref.kind == "dir" else []
    return {blob_rel(ref.digest), *(blob_rel(f.digest) for f in files)}


def intact(store: Store, manifests: list[Manifest]) -> bool:
    return all(store.verify(ref) == [] for m in manifests for ref in (*m.inputs.values(), *m.outputs.values()))


@pytest.fixture
def stream(store: Store, tmp_path: Path) -> dict[str, Manifest]:
    """Two runs of config F on tasks [a, b] whose merge chain and evals differ (the second replaced b's data),
    one run of config G on [a]; latest = r2. r1's merge[b] state shares one file with r2's."""
    s = Stages(store, tmp_path)
    st: dict[str, Manifest] = {}
    st["base"] = s.add("base", {"model": {"config.json": b"{}", "weights.safetensors": b"w" * 5000}})
    st["data_a"] = s.add("data", {"task": b"a" * 300})
    st["merge_a"] = s.add("merge", {"state": {"C.safetensors": b"c" * 800}}, base=st["base"], data=st["data_a"])
    for run in ("1", "2"):
        st[f"data_b{run}"] = s.add("data", {"task": f"b{run}".encode() * 200})
        st[f"merge_b{run}"] = s.add("merge", {"state": {"C.safetensors": b"shared C" * 100, "B.safetensors": f"B{run}".encode() * 700}},
                                    previous=st["merge_a"], data=st[f"data_b{run}"])
        st[f"eval_b{run}"] = s.add("eval", {"scores": f'{{"run": {run}}}'.encode()}, merge=st[f"merge_b{run}"])
    st["merge_g"] = s.add("merge", {"state": {"C.safetensors": b"g" * 900}}, base=st["base"], data=st["data_a"])
    shared = [st["base"], st["data_a"], st["merge_a"]]
    write_run(store, "r1", [*shared, st["data_b1"], st["merge_b1"], st["eval_b1"]], ["a", "b"])
    write_run(store, "r2", [*shared, st["data_b2"], st["merge_b2"], st["eval_b2"]], ["a", "b"], latest=True)
    write_run(store, "r3", [st["base"], st["data_a"], st["merge_g"]], ["a"], fingerprint=G)
    return st


def test_keep_last_removes_superseded_stages_and_only_their_blobs(store: Store, store_url: str, stream: dict) -> None:
    before = stored_objects(store_url)
    dry = store.gc(keep_last=1, min_age_seconds=0)
    gone = [stream["data_b1"], stream["merge_b1"], stream["eval_b1"]]
    assert set(dry.superseded) == {manifest_rel(m) for m in gone}
    assert dry.dropped_runs == ("runs/r1.json",) and dry.kept_runs == ("r2", "r3") and dry.stale_runs == ()
    only_r1 = set().union(*(blobs_of(store, ref) for m in gone for ref in m.outputs.values()))
    shared_file = blob_rel(store.read_listing(stream["merge_b1"].outputs["state"], context="t").files["C.safetensors"].digest)
    assert set(dry.blobs) == only_r1 - {shared_file} and dry.partial_files == ()
    assert not dry.deleted and stored_objects(store_url) == before  # a dry run only reports

    report = store.gc(keep_last=1, min_age_seconds=0, delete=True)
    after = stored_objects(store_url)
    assert report.deleted and report.removed == dry.removed
    assert set(before) - set(after) == set(report.removed)
    assert report.freed_bytes == sum(len(before[rel]) for rel in report.removed)  # bytes freed, counted exactly
    assert report.as_json()["counts"] == {"stages": 3, "blobs": len(only_r1) - 1, "partial_files": 0, "runs": 1, "leases": 0,
                                           "outputs": 0}
    kept = [m for name, m in stream.items() if name not in ("data_b1", "merge_b1", "eval_b1")]
    assert all(store.read_manifest(m.stage, m.key) == m for m in kept) and intact(store, kept)
    assert store.read_run("latest")["run_id"] == "r2"
    assert store.gc(keep_last=1, min_age_seconds=0).removed == ()  # nothing left to collect


def test_without_keep_last_every_listed_and_unlisted_stage_stays(store: Store, store_url: str, stream: dict) -> None:
    before = stored_objects(store_url)
    report = store.gc(min_age_seconds=0, delete=True)
    assert report.removed == () and report.freed_bytes == 0 and stored_objects(store_url) == before


def test_young_stages_are_spared_but_their_dropped_run_is_not(store: Store, stream: dict) -> None:
    young = store.gc(keep_last=1, delete=True)  # default grace period: every stage here is seconds old
    assert young.superseded == () and young.orphans == () and young.dropped_runs == ("runs/r1.json",)
    old = store.gc(keep_last=1, min_age_seconds=0, delete=True)  # r1's stages are now listed by no run at all
    assert set(old.superseded) == {manifest_rel(stream[n]) for n in ("data_b1", "merge_b1", "eval_b1")}


def test_a_live_run_lease_stops_a_deleting_gc_until_the_run_has_written_its_summary(
    store: Store, store_url: str, stream: dict
) -> None:
    # A run in progress (its lease is live; no summary yet) reverts b's data: it finds r1's stages cached and
    # is about to read their blobs, though the only summary listing them is r1's, which keep_last=1 drops.
    with leases.hold(store, "run", "r4"):
        before = stored_objects(store_url)
        report = store.gc(keep_last=1, min_age_seconds=0, delete=True)
        assert not report.deleted and report.in_progress and "run r4 on host" in report.in_progress[0]
        assert manifest_rel(stream["merge_b1"]) in report.superseded  # what it would have deleted
        assert stored_objects(store_url) == before  # ... and did not
        r1 = [stream[n] for n in ("base", "data_a", "merge_a", "data_b1", "merge_b1", "eval_b1")]
        assert intact(store, r1)
        write_run(store, "r4", r1, ["a", "b"], latest=True)  # the run completes, then releases its lease
    report = store.gc(keep_last=1, min_age_seconds=0, delete=True)
    assert report.deleted and report.dropped_runs == ("runs/r1.json", "runs/r2.json")
    assert set(report.superseded) == {manifest_rel(stream[n]) for n in ("data_b2", "merge_b2", "eval_b2")}
    assert intact(store, r1) and all(store.read_manifest(m.stage, m.key) for m in r1)


def test_dead_leases_stop_nothing_and_are_collected(store: Store, store_url: str, stream: dict) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=leases.LEASE_SECONDS + 60)
    dead = leases.new_lease("run", "crashed").model_copy(update={"expires": past.isoformat(timespec="seconds")})
    store.write_lease(dead)
    report = store.gc(keep_last=1, min_age_seconds=0, delete=True)
    assert report.deleted and report.in_progress == () and report.expired_leases == ("leases/crashed.json",)
    assert not any(rel.startswith("leases/") for rel in stored_objects(store_url))


def test_an_unreadable_lease_counts_as_a_live_run_and_a_partial_one_is_collected(store: Store, store_url: str) -> None:
    overwrite(store_url, "leases/r5.json", b"{not json")
    overwrite(store_url, "leases/.r6.json.tmp-0f0f", b"half a lease")
    report = store.gc(min_age_seconds=0, delete=True)
    assert not report.deleted and "run r5 on host ?" in report.in_progress[0]
    assert report.partial_files == ("leases/.r6.json.tmp-0f0f",)


def test_a_run_waits_for_a_deleting_gc_and_a_gc_never_runs_beside_a_run(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(leases, "WAIT_POLL_SECONDS", 0.05)
    monkeypatch.setattr(leases, "HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(leases, "LEASE_SECONDS", 1.0)
    entered = threading.Event()

    def run() -> None:
        with leases.run_lease(store, "r9"):
            entered.set()

    with leases.hold(store, "gc") as gc:
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(2.5)  # longer than LEASE_SECONDS: only the heartbeat keeps the gc lease live
        assert not entered.is_set()
        assert [lease.id for lease in leases.live(store, "gc")] == [gc.id]
        assert store.gc(delete=True, min_age_seconds=0).in_progress  # the waiting run's lease is live too
    thread.join(timeout=30)
    assert entered.is_set() and store.leases() == []  # both released


def test_gc_on_no_store_creates_nothing(store_url: str, tmp_path: Path) -> None:
    with pytest.raises(BadStoreURL, match=r"^no store at (file|s3)://\S+: "):
        Store.open(store_url, cache_dir=tmp_path / "cache", create=False)
    assert stored_objects(store_url) == {}
    if store_url.startswith("file://"):
        assert not Path(store_url.removeprefix("file://")).exists()
    Store.open(store_url, cache_dir=tmp_path / "cache").put_bytes(b"x")
    Store.open(store_url, cache_dir=tmp_path / "cache", create=False)  # a store now


def run(run_id: str, tasks: str, fingerprint: str | None = F, written: float = 0.0) -> RunInfo:
    return RunInfo(run_id, fingerprint, tuple(tasks), frozenset(), written)


RETENTION = [
    # (runs oldest first, keep_last, kept)
    ([run("r1", "a"), run("r2", "ab"), run("r3", "abc")], 1, {"r3"}),  # a stream that grew
    ([run("r1", "a"), run("r2", "ab"), run("r3", "abc")], 2, {"r2", "r3"}),
    ([run("r1", "abc"), run("r2", "ab")], 1, {"r1", "r2"}),  # a shorter trial never evicts the longer stream
    ([run("r1", "ab"), run("r2", "ba")], 1, {"r1", "r2"}),  # nor does another task order
    ([run("r1", "ab"), run("r2", "ab", G)], 1, {"r1", "r2"}),  # nor another config
    ([run("r1", "ab", None), run("r2", "abc", None), run("r3", "ab")], 1, {"r2", "r3"}),  # fingerprint-less summaries: one config
    ([run("r2", "ab", written=1.0), run("r1", "ab", written=2.0)], 1, {"r1"}),  # newer by the store's clock, then by id
]


@pytest.mark.parametrize(("runs", "keep_last", "kept"), RETENTION)
def test_retention_rule(runs: list[RunInfo], keep_last: int, kept: set[str]) -> None:
    assert kept_runs(runs, keep_last) == kept


@pytest.mark.parametrize("keep_last", [0, -1, 1.5, True])
def test_keep_last_must_be_a_whole_number_of_at_least_one(keep_last) -> None:
    with pytest.raises(ValueError, match="keep_last must be a whole number ≥ 1"):
        kept_runs([], keep_last)
