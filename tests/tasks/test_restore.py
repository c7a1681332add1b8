"""Superseded merge states (docs/design.md §3.4, issue #17): `gc --keep-last` collects the state of every merge link
that the next link has read, keeps the newest link's and every manifest; a cached rerun still finds every stage, the
next incremental step reads the kept state, and a link computed after the stream changed recomputes the collected
states it needs (tasks.restore) — to the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.synthetic import ALL_TOKENS, Shape, write_task
from tasks.cache import intact, lookup, run_stage
from tasks.catalog import recomputable_outputs, stage_def
from tasks.restore import restore_inputs
from tasks.rows.many import compute_merge
from tasks.store import BlobRef, Manifest, Store, StoreError

SHAPE = Shape(layers=1, hidden=8, intermediate=12, rank=2)
CONFIG = ALL_TOKENS


def task_inputs(store: Store, seed: int, scratch: Path) -> dict[str, BlobRef]:
    task_dir, grams = write_task(SHAPE, seed=seed, out=scratch)
    return {"finetune": store.put(task_dir), "grams": store.put(grams)}


def merge(store: Store, inputs: dict[str, BlobRef], repair: bool = False) -> Manifest:
    definition = stage_def("merge", inputs)
    return run_stage(store, definition, CONFIG, inputs,
                     lambda local, workdir: compute_merge(local, workdir, config=CONFIG, device="cpu"),
                     repair=repair).manifest


def recompute(store: Store, log: list[str]):
    def run(producer: Manifest) -> Manifest:
        log.append(producer.key)
        return merge(store, dict(producer.inputs), repair=True)
    return run


def stream(store: Store, seeds: list[int], scratch: Path) -> list[Manifest]:
    links: list[Manifest] = []
    for seed in seeds:
        inputs = task_inputs(store, seed, scratch)
        if links:
            inputs["previous"] = links[-1].outputs["state"]
        links.append(merge(store, inputs))
    return links


def summary(store: Store, run_id: str, links: list[Manifest], tasks: list[str]) -> None:
    store.write_run(run_id, {"run_id": run_id, "tasks": tasks, "config_fingerprint": "f" * 64,
                             "stages": [{"stage": m.stage, "key": m.key} for m in links]})


@pytest.fixture()
def collected(tmp_path: Path) -> tuple[Store, list[Manifest]]:
    """A 4-task merge chain, run once, then `gc --keep-last 1` (no grace period)."""
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    links = stream(store, [1, 2, 3, 4], tmp_path / "inputs")
    summary(store, "r1", links, ["a", "b", "c", "d"])
    report = store.gc(delete=True, min_age_seconds=0, keep_last=1, recomputable=recomputable_outputs())
    assert report.superseded == ()  # every stage is kept (the run lists them) …
    assert sorted(report.recomputable) == sorted(f"merge/{m.key}:state" for m in links[:-1])  # … their states go
    assert report.freed_bytes >= sum(m.outputs["state"].size for m in links[:-1])
    return store, links


def test_gc_collects_every_superseded_state_and_keeps_the_newest(collected) -> None:
    store, links = collected
    assert [store.has_blob(m.outputs["state"].digest) for m in links] == [False, False, False, True]
    for m in links:  # adapters, exports and every manifest stay
        assert store.read_manifest("merge", m.key) == m
        assert all(store.has_blob(m.outputs[name].digest) for name in ("adapter", "export"))
        assert intact(store, m, recomputable_outputs()["merge"])  # what `run --repair` checks: collected is not broken
    assert not intact(store, links[0])
    # without retention nothing of a kept stage goes
    again = store.gc(delete=True, min_age_seconds=0, recomputable=recomputable_outputs())
    assert again.recomputable == () and store.has_blob(links[-1].outputs["state"].digest)


def test_a_cached_rerun_and_the_next_step_still_work(collected, tmp_path: Path) -> None:
    store, links = collected
    for m in links:  # a cached rerun: every stage found from its manifest alone
        assert lookup(store, stage_def("merge", m.inputs), CONFIG, m.inputs) == m
    inputs = task_inputs(store, 5, tmp_path / "inputs") | {"previous": links[-1].outputs["state"]}
    log: list[str] = []
    assert restore_inputs(store, "merge", inputs, recompute(store, log), recomputable_outputs()) == []
    fifth = merge(store, inputs)
    assert log == [] and store.has_blob(fifth.outputs["state"].digest)


def test_a_changed_stream_recomputes_the_collected_states_it_needs(collected, tmp_path: Path) -> None:
    store, links = collected
    # tasks a, b, c' : link 2 now reads link 1's state, which gc collected (and link 1 needs link 0's)
    inputs = task_inputs(store, 33, tmp_path / "inputs") | {"previous": links[1].outputs["state"]}
    log: list[str] = []
    restored = restore_inputs(store, "merge", inputs, recompute(store, log), recomputable_outputs())
    assert log == [links[0].key, links[1].key] and [m.key for m in restored] == log
    assert all(store.has_blob(m.outputs["state"].digest) for m in links[:2])
    changed = merge(store, inputs)
    # the same bytes as in a store that never collected anything
    fresh = Store.open(str(tmp_path / "fresh"), cache_dir=tmp_path / "fresh-cache")
    expected = stream(fresh, [1, 2, 33], tmp_path / "fresh-inputs")[-1]
    assert changed.outputs == expected.outputs and changed.key == expected.key


def test_a_recompute_that_gives_other_bytes_is_an_error(collected, tmp_path: Path) -> None:
    store, links = collected
    inputs = task_inputs(store, 33, tmp_path / "inputs") | {"previous": links[1].outputs["state"]}

    def wrong(producer: Manifest) -> Manifest:
        return links[-1]  # not what the consumer reads

    with pytest.raises(StoreError, match="not deterministic"):
        restore_inputs(store, "merge", inputs, wrong, recomputable_outputs())
