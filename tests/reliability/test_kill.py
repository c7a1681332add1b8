"""kill -9 anywhere, then resume (issue #9.1, docs/design.md §3: "a crash leaves at most orphan blobs").

`many run` of the small stream runs as a subprocess in its own session and is SIGKILLed — driver, Ray and
workers at once — then rerun, over and over on one store: at every stage boundary (the test hook
MANY_FAULT_AFTER_BLOBS=<cache key> kills right after that stage's blobs are stored, before its manifest)
and, on a second store, at random times after the first stage starts. After every kill no manifest points
at a missing or corrupt blob and the rerun starts no stage whose manifest existed; the run that finally
completes reports those stages `cached`, and its merged adapter is bit-identical (same sha256) to an
uninterrupted run's.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    assert_store_sound,
    final_adapter_digest,
    labels,
    many,
    many_env,
    started_stages,
    where,
    write_config,
)

pytestmark = pytest.mark.slow
BOUNDARY_KILLS = 8  # every stage kind once (when a parallel stage has not finished it first), then more
RANDOM_KILLS = 3
KILLS_NEEDED = 10


def kill_and_resume(store: str, tmp: Path, reference: dict, next_kill) -> tuple[int, dict]:
    """Run with the kill `next_kill(done)` picks ({} env of a hook, or seconds; None: no kill) until a run
    completes; check the store after every kill. Returns (kills that landed, the completing run's summary)."""
    names = labels(reference)
    tmp.mkdir(parents=True, exist_ok=True)
    argv = ["run", "--json", "--config", str(write_config(tmp / "small.yaml")), "--store", store]
    done: set[str] = set()
    landed = 0
    while True:
        point = next_kill(done, landed)
        hook = point if isinstance(point, dict) else {}
        seconds = point if isinstance(point, float) else None
        outcome = many(argv, many_env(tmp, **hook), kill_after_first_stage_seconds=seconds)
        restarted = {(names[n][0], where(*names[n][1:])) for n in done} & started_stages(outcome.err)
        assert not restarted, f"kill point {point}: the rerun recomputed stages finished before the kill: {restarted}"
        if outcome.code == 0:
            break
        assert outcome.code == -9, f"kill point {point}: exit {outcome.code}: {outcome.last_line}"
        landed += 1
        found = assert_store_sound(store)
        assert set(found) <= set(names), f"a stage key no uninterrupted run has: {set(found) - set(names)}"
        assert set(found) >= done
        done = set(found)
    summary = outcome.summary
    assert all(s["status"] == "cached" for s in summary["stages"] if f"{s['stage']}/{s['key']}" in done)
    assert {f"{s['stage']}/{s['key']}" for s in summary["stages"]} == set(names)
    assert final_adapter_digest(store, summary) == final_adapter_digest(store, reference)  # keys equal too
    assert_store_sound(store)
    return landed, summary


def test_kill_9_at_stage_boundaries_and_at_random_times_then_resume(
    reference: tuple[str, dict], tmp_path: Path, record_property
) -> None:
    reference_store, reference_summary = reference
    order = [f"{s['stage']}/{s['key']}" for s in reference_summary["stages"]]  # the flow's submission order
    targeted: list[str] = []  # this round's kill points
    hit_kinds: list[str] = []  # every round's, for the record
    at_boundaries = 0

    def next_boundary(done: set[str], landed: int) -> dict[str, str] | None:
        """A stage not targeted before and without a manifest, of a kind not hit yet if any: kill it between
        its blobs and its manifest."""
        hit = {name.split("/")[0] for name in targeted}
        todo = sorted((n for n in order if n not in done and n not in targeted), key=lambda n: (n.split("/")[0] in hit, order.index(n)))
        if at_boundaries + landed >= BOUNDARY_KILLS or not todo:
            return None
        targeted.append(todo[0])
        hit_kinds.append(todo[0].split("/")[0])
        return {"MANY_FAULT_AFTER_BLOBS": todo[0].split("/")[1]}

    # On an idle machine parallel stages finish before they can be targeted, so one store may offer fewer than
    # BOUNDARY_KILLS boundaries: go on with a fresh store (bounded) until enough kills have landed.
    for round_ in range(3):
        targeted.clear()
        landed, _ = kill_and_resume(
            f"file://{tmp_path / f'a{round_}' / 'store'}", tmp_path / f"a{round_}", reference_summary, next_boundary
        )
        at_boundaries += landed
        if at_boundaries >= BOUNDARY_KILLS:
            break
    rng = random.Random(9)

    def next_random(done: set[str], landed: int) -> float | None:
        return rng.uniform(0.5, 6.0) if landed < RANDOM_KILLS else None

    at_random, summary = kill_and_resume(f"file://{tmp_path / 'b' / 'store'}", tmp_path / "b", reference_summary, next_random)
    record_property("figure", f"kill -9: {at_boundaries} at stage boundaries ({', '.join(hit_kinds)}), "
                              f"{at_random} at random times")  # benchmarks/reliability.py
    assert at_boundaries + at_random >= KILLS_NEEDED
    assert final_adapter_digest(reference_store, reference_summary) == final_adapter_digest(
        f"file://{tmp_path / 'b' / 'store'}", summary)
