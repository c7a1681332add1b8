"""Fast tests of the stage adapters' plumbing: stage definitions, cache-key inputs, the retry rule."""

from __future__ import annotations

import pytest

from many.config import LPMConfig
from tasks.cache import cache_key
from tasks.catalog import stage_def
from tasks.dispatch import StageRecord, _transient
from tasks.runtime import ClusterError
from tasks.store import BlobRef, CorruptArtifact, StoreError

REF = BlobRef(digest="a" * 64, size=1)


def test_stage_inputs_follow_the_wiring_and_change_the_key() -> None:
    first = stage_def("merge", {"finetune": REF, "grams": REF})
    later = stage_def("merge", {"finetune": REF, "grams": REF, "previous": REF})
    assert first.outputs == ("state", "adapter", "export") and later.inputs == ("finetune", "grams", "previous")
    key = cache_key(first, LPMConfig(), {"finetune": REF, "grams": REF})
    assert key != cache_key(first, LPMConfig(gamma=1e-3), {"finetune": REF, "grams": REF})
    assert key != cache_key(later, LPMConfig(), {"finetune": REF, "grams": REF, "previous": REF})
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        stage_def("train", {})


def test_record_summary_has_the_json_fields() -> None:
    record = StageRecord("eval", "chart-qa", "many", "k" * 64, "computed", 0.01234, "node-1", {"scores": REF}, 3)
    assert record.summary() == {"stage": "eval", "task": "chart-qa", "method": "many", "key": "k" * 64,
                                "status": "computed", "seconds": 0.012, "node": "node-1", "s3_retries": 3}


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self):
        raise self.error


@pytest.mark.parametrize(("error", "retry"), [
    (StoreError("S3 timed out"), True),
    (ConnectionResetError("reset"), True),
    (ValueError("bad config"), False),
    (ClusterError("no GPU"), False),
    (CorruptArtifact("blob x", "stage y", "is missing"), False),
    (RuntimeError("a bug"), False),
])
def test_only_transient_failures_are_retried(error: BaseException, retry: bool) -> None:
    assert _transient(None, None, _Failed(error)) is retry
