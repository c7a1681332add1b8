"""tasks/dispatch.py: a run whose flow has ended (`end_run`) starts no stage and never Ray again — a flow left by an
exception still has stage threads running after it shuts Ray down."""

from __future__ import annotations

import pytest

from many.config import LPMConfig
from tasks import dispatch
from tasks.dispatch import ClusterSpec, StageAbandoned, end_run
from tasks.runtime import StoreSpec


def test_a_stage_of_an_ended_run_raises_before_it_starts_ray(monkeypatch) -> None:
    started: list[str] = []
    monkeypatch.setattr(dispatch, "ensure_ray", lambda *args: started.append("ray"))

    def past_the_start(*args) -> None:
        raise RuntimeError("past Ray's start")

    monkeypatch.setattr(dispatch, "check_resources", past_the_start)
    run = "20261208T000000Z-ended"

    def compute(run_id: str) -> None:
        dispatch._compute_on_ray("merge", LPMConfig(), {}, StoreSpec("memory://x"), ClusterSpec(), 1.0, 0.0, "merge",
                                 "t", "many", run_id=run_id)

    end_run(run)
    with pytest.raises(StageAbandoned, match="the run is over"):
        compute(run)
    assert started == []  # Ray was not started (nor joined) for a stage of an ended run
    with pytest.raises(RuntimeError, match="past Ray's start"):  # a run that goes on starts Ray
        compute("20261208T000000Z-live")
    assert started == ["ray"]
