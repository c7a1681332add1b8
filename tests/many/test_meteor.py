"""The shared METEOR scorer (many/meteor.py): the same scores as a fresh pycocoevalcap scorer per call — what
many.metrics did before — from one JVM per process, replaced if it dies."""

from __future__ import annotations

import pytest
from pycocoevalcap.meteor.meteor import Meteor

from many import meteor as shared
from many.metrics import caption_scores

FIRST = ({0: ["a red circle left of a blue square"], 1: ["a blurred photo of a cup", "a dark cup"]},
         {0: ["a red circle on the left"], 1: ["a dark photo of a cup"]})
SECOND = ({0: ["two green triangles"], 1: ["a tilted photo of a lamp"], 2: ["a striped star"]},
          {0: ["a green triangle"], 1: ["a photo of a lamp"], 2: ["a noisy star"]})


def fresh(gts, res) -> float:
    """METEOR as many.metrics computed it before: a new JVM for the call, stopped after it."""
    scorer = Meteor()
    try:
        return scorer.compute_score(gts, res)[0]
    finally:
        del scorer


def test_shared_scorer_scores_like_a_fresh_one_from_one_jvm() -> None:
    expected = [fresh(*FIRST), fresh(*SECOND)]
    shared.stop()
    got = [shared.meteor(*FIRST), shared.meteor(*SECOND), shared.meteor(*FIRST)]
    assert got == [expected[0], expected[1], expected[0]]
    assert expected[0] != expected[1]  # the two batches tell a stale answer from a right one
    pid = shared._scorer.meteor_p.pid
    shared.meteor(*SECOND)
    assert shared.started() and shared._scorer.meteor_p.pid == pid  # no second JVM


def test_a_dead_jvm_is_replaced() -> None:
    shared.meteor(*FIRST)
    old = shared._scorer.meteor_p
    old.kill()
    old.wait()
    assert shared.meteor(*SECOND) == pytest.approx(fresh(*SECOND), abs=0)
    assert shared._scorer.meteor_p.pid != old.pid
    shared.stop()
    assert not shared.started()


def test_caption_scores_unchanged_by_the_shared_scorer() -> None:
    predictions = ["a red circle on the left", "a dark photo of a cup", "a green triangle"]
    references = ["a red circle left of a blue square", ["a blurred photo of a cup", "a dark cup"], "two green triangles"]
    first = caption_scores(predictions, references)
    second = caption_scores(predictions, references)  # the same process's JVM, reused
    assert first == second
    shared.stop()
    assert caption_scores(predictions, references)["METEOR"] == first["METEOR"] > 0
