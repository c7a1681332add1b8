"""What a mini-UCIT task kind is (docs/design.md §7): an image distribution with its own instruction format,
plus generic captions of the same images for base pretraining."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image
from pydantic import NonNegativeInt, PositiveInt

from many.config import Frozen
from many.data.schema import Metric


class MiniUcitConfig(Frozen):
    """Size and seed of the synthetic stream; each task kind and split derives its own seed from `seed`."""

    seed: NonNegativeInt = 0
    n_train: PositiveInt = 800
    n_test: PositiveInt = 200
    image_size: PositiveInt = 32


class Example(NamedTuple):
    image: Image.Image
    prompt: str
    answer: str


class Caption(NamedTuple):
    image: Image.Image
    caption: str


Generator = np.random.Generator


@dataclass(frozen=True)
class TaskKind:
    """One task of the stream. `instruct` draws an instruction sample, `describe` draws an image of the same
    distribution with a generic caption (no task format, no task answer); `words` covers every word either emits."""

    name: str
    metric: Metric
    instruct: Callable[[Generator, int], Example]
    describe: Callable[[Generator, int], Caption]
    words: frozenset[str]
