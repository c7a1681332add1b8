"""Checks on task data before any stage trains on it (docs/design.md §7): every error names the problem,
where it is (file / task / sample id) and what to fix."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from many.data.schema import Sample


class DataError(ValueError):
    """Bad input data: a missing or corrupt image, an empty task, a conversation without an answer."""


def decode_image(data: bytes, where: str) -> Image.Image:
    """Fully decode `data` (PIL `verify()` for the container, then `load()` for the pixels) or raise DataError."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # verify() leaves the image unusable: reopen to load the pixels
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"corrupt image in {where}: cannot decode ({error}); re-export it as PNG or JPEG") from error
    return image


def validate_samples(samples: Sequence[Sample], task: str) -> None:
    """Raise DataError unless `samples` is non-empty, ids are unique, texts non-empty and images decodable PNGs."""
    if not samples:
        raise DataError(f"empty task {task!r}: no samples; check the data source of this task")
    seen: set[str] = set()
    for sample in samples:
        where = f"task {task!r}, sample {sample.sample_id!r}"
        if sample.sample_id in seen:
            raise DataError(f"duplicate sample id in {where}; sample ids must be unique within a task")
        seen.add(sample.sample_id)
        if not sample.prompt.strip():
            raise DataError(f"empty prompt in {where}; every sample needs an instruction")
        if not sample.answer.strip():
            raise DataError(f"empty answer in {where}; every sample needs a reference answer")
        image = decode_image(sample.image, where)
        if image.format != "PNG":
            raise DataError(f"image in {where} is {image.format}, not PNG; encode images with `png_bytes`")
