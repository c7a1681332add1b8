"""One instruction sample and one task's data: the unit every stage reads (docs/design.md §7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Metric = Literal["exact_match", "caption"]


@dataclass(frozen=True)
class Sample:
    """One single-turn visual instruction: an image (PNG bytes), a prompt and the reference answer."""

    sample_id: str
    image: bytes  # PNG
    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskData:
    """A task of the stream: its name, how it is scored, and its train/test splits."""

    name: str
    metric: Metric
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
