"""Validation of task data (docs/design.md §7): each bad input raises DataError naming the problem and the sample."""

from __future__ import annotations

import dataclasses
import io
import re

import pytest
from PIL import Image

from many.data import DataError, MiniUcitConfig, Sample, decode_image, make_task, validate_samples

GOOD = make_task("icon-qa", MiniUcitConfig(n_train=3, n_test=1)).train


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _with(index: int, **change: object) -> tuple[Sample, ...]:
    samples = list(GOOD)
    samples[index] = dataclasses.replace(samples[index], **change)
    return tuple(samples)


WHERE = "in task 'icon-qa', sample 'icon-qa/train/00000"
BAD_SAMPLES = [
    ("empty task", (), "empty task 'icon-qa': no samples"),
    ("duplicate id", _with(2, sample_id=GOOD[0].sample_id), f"duplicate sample id {WHERE}0'"),
    ("empty prompt", _with(1, prompt=" "), f"empty prompt {WHERE}1'"),
    ("empty answer", _with(1, answer=""), f"empty answer {WHERE}1'"),
    ("corrupt image", _with(2, image=b"not an image"), f"corrupt image {WHERE}2'"),
    ("truncated png", _with(0, image=GOOD[0].image[:60]), f"corrupt image {WHERE}0'"),
    ("jpeg, not png", _with(0, image=_jpeg()), "is JPEG, not PNG"),
]


@pytest.mark.parametrize(("case", "samples", "message"), BAD_SAMPLES, ids=[c[0] for c in BAD_SAMPLES])
def test_bad_samples_are_named(case: str, samples: tuple[Sample, ...], message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        validate_samples(samples, "icon-qa")


def test_good_samples_pass_and_decode() -> None:
    validate_samples(GOOD, "icon-qa")
    assert decode_image(GOOD[0].image, "here").size == (32, 32)
    assert issubclass(DataError, ValueError)
