"""The mini-UCIT stream (docs/design.md §7): the task-kind registry in UCIT order, deterministic task splits,
the base's pretraining mixture (generic captions of every image kind, generic questions), and the vocabulary of the
tasks and the captions."""

from __future__ import annotations

import zlib

import numpy as np

from many.data.draw import png_bytes
from many.data.mini_ucit import (
    chart_qa,
    count_math,
    generic,
    grounded_caption,
    icon_qa,
    noisy_caption,
    single_object,
    style_cls,
)
from many.data.mini_ucit.kind import Example, Generator, MiniUcitConfig, TaskKind
from many.data.mini_ucit.text import words_of
from many.data.schema import Sample, TaskData
from many.data.validate import DataError

TASK_KINDS: dict[str, TaskKind] = {
    module.KIND.name: module.KIND
    for module in (style_cls, chart_qa, noisy_caption, icon_qa, count_math, grounded_caption)
}
# UCIT's order: ImageNet-R, ArxivQA, VizWiz-caption, IconQA, CLEVR-Math, Flickr30k
UCIT_ORDER = ("style-cls", "chart-qa", "noisy-caption", "icon-qa", "count-math", "grounded-caption")
PRETRAIN_PROMPT = "describe the image."
MAX_DRAWS_PER_SAMPLE = 20  # a test split redraws images that also occur in train; give up if the space is that small


def _rng(cfg: MiniUcitConfig, stream: str, split: str) -> Generator:
    """An independent generator per (seed, task kind, split): adding a task never shifts another's data."""
    return np.random.default_rng([cfg.seed, zlib.crc32(stream.encode()), zlib.crc32(split.encode())])


def task_kind(name: str) -> TaskKind:
    if name not in TASK_KINDS:
        raise DataError(f"unknown mini-UCIT task kind {name!r}; known kinds: {', '.join(TASK_KINDS)}")
    return TASK_KINDS[name]


def _split(kind: TaskKind, cfg: MiniUcitConfig, split: str, n: int, exclude: frozenset[bytes]) -> tuple[Sample, ...]:
    rng = _rng(cfg, kind.name, split)
    samples: list[Sample] = []
    for _ in range(MAX_DRAWS_PER_SAMPLE * n):
        if len(samples) == n:
            break
        example = kind.instruct(rng, cfg.image_size)
        image = png_bytes(example.image)
        if image not in exclude:
            samples.append(Sample(f"{kind.name}/{split}/{len(samples):06d}", image, example.prompt, example.answer))
    if len(samples) < n:
        raise DataError(
            f"task {kind.name!r}: only {len(samples)} of {n} {split} images are new after {MAX_DRAWS_PER_SAMPLE * n} "
            "draws; lower n_test/n_train or raise image_size"
        )
    return tuple(samples)


def make_task(kind: str, cfg: MiniUcitConfig) -> TaskData:
    """The task's train and test splits; no test image also occurs in train."""
    task = task_kind(kind)
    train = _split(task, cfg, "train", cfg.n_train, frozenset())
    test = _split(task, cfg, "test", cfg.n_test, frozenset(sample.image for sample in train))
    return TaskData(task.name, task.metric, train, test)


def pretrain_samples(cfg: MiniUcitConfig, n: int) -> tuple[Sample, ...]:
    """`n` samples of the base's generic instruction mixture: every other one a generic caption ("describe the
    image." → "a bar chart with four bars"), cycling through every task's image kind and single objects on plain
    backdrops; the others cycle through the generic questions and the text echo of `generic` (its own shapes and
    colours, no task's). No task prompt or task answer format appears."""
    describers = [kind.describe for kind in TASK_KINDS.values()] + [single_object.describe]
    rng = _rng(cfg, "pretrain", "train")
    examples: list[Example] = []
    for i in range(n):
        j = i // 2
        if i % 2 == 0:
            image, caption = describers[j % len(describers)](rng, cfg.image_size)
            examples.append(Example(image, PRETRAIN_PROMPT, caption))
        elif j % (len(generic.QUESTIONS) + 1) < len(generic.QUESTIONS):
            examples.append(generic.QUESTIONS[j % (len(generic.QUESTIONS) + 1)](rng, cfg.image_size))
        else:
            examples.append(generic.echo(rng, cfg.image_size, index=j // (len(generic.QUESTIONS) + 1)))
    return tuple(
        Sample(f"pretrain/train/{i:06d}", png_bytes(image), prompt, answer)
        for i, (image, prompt, answer) in enumerate(examples)
    )


def vocabulary() -> list[str]:
    """Every word (lowercase, punctuation excluded: see `text.PUNCTUATION`) a task generator or a generic caption can
    emit, sorted: what the mini-UCIT tasks speak (the generic questions of the pretraining mixture add their own)."""
    found = words_of(PRETRAIN_PROMPT).union(single_object.WORDS, *(kind.words for kind in TASK_KINDS.values()))
    return sorted(found)
