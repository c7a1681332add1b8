"""mini-UCIT (docs/design.md §7): deterministic disjoint splits, a closed vocabulary, tasks that differ in images and
instruction formats."""

from __future__ import annotations

import io
import re
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from flows.config import DataConfig
from many.data import (
    PRETRAIN_PROMPT,
    PUNCTUATION,
    TASK_KINDS,
    UCIT_ORDER,
    DataError,
    MiniUcitConfig,
    TaskData,
    make_task,
    pretrain_samples,
    tokens,
    validate_samples,
    vocabulary,
    words,
)
from many.data.draw import PALETTE, SHAPES
from many.data.mini_ucit import generic as generic_data

SMALL = MiniUcitConfig(n_train=60, n_test=30)
NUMBER_WORDS = {"zero", "one", "two", "three", "four", "five"}
CAPTION_PATTERNS = {
    "noisy-caption": r"a (blurry|dark|tilted|covered) photo of an? "
    r"(red|green|blue|yellow|purple|orange) (circle|square|triangle|star)",
    "grounded-caption": r"an? \w+ \w+ (left of|right of|above|below) an? \w+ \w+",
}


@pytest.fixture(scope="module")
def tasks() -> dict[str, TaskData]:
    return {kind: make_task(kind, SMALL) for kind in UCIT_ORDER}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64)


def test_order_is_the_ucit_stream_and_the_registry() -> None:
    assert UCIT_ORDER == ("style-cls", "chart-qa", "noisy-caption", "icon-qa", "count-math", "grounded-caption")
    assert set(TASK_KINDS) == set(UCIT_ORDER)
    assert {k: TASK_KINDS[k].metric for k in ("noisy-caption", "grounded-caption")} == {
        "noisy-caption": "caption",
        "grounded-caption": "caption",
    }
    assert all(TASK_KINDS[k].metric == "exact_match" for k in ("style-cls", "chart-qa", "icon-qa", "count-math"))


def test_tasks_are_valid_with_ids_sizes_and_disjoint_splits(tasks: dict[str, TaskData]) -> None:
    for kind, task in tasks.items():
        assert (task.name, len(task.train), len(task.test)) == (kind, 60, 30)
        validate_samples(task.train + task.test, kind)
        assert task.train[17].sample_id == f"{kind}/train/000017"
        assert task.test[0].sample_id == f"{kind}/test/000000"
        assert not {s.image for s in task.train} & {s.image for s in task.test}
        assert Image.open(io.BytesIO(task.train[0].image)).size == (32, 32)
        assert Image.open(io.BytesIO(task.train[0].image)).mode == "RGB"


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tasks: dict[str, TaskData]) -> None:
    for kind in UCIT_ORDER:
        again = make_task(kind, SMALL)
        assert again == tasks[kind]
        other = make_task(kind, SMALL.model_copy(update={"seed": 1}))
        assert [s.image for s in other.train] != [s.image for s in again.train]
    assert pretrain_samples(SMALL, 20) == pretrain_samples(SMALL, 20)
    assert pretrain_samples(SMALL, 20) != pretrain_samples(SMALL.model_copy(update={"seed": 1}), 20)


def test_a_task_does_not_depend_on_the_split_sizes_of_the_other_split() -> None:
    smaller = make_task("chart-qa", MiniUcitConfig(n_train=60, n_test=5))
    assert smaller.train == make_task("chart-qa", SMALL).train


@pytest.mark.parametrize("size", [16, 48])
@pytest.mark.parametrize("kind", UCIT_ORDER)
def test_image_size_is_configurable(kind: str, size: int) -> None:
    """16 px is the test fixtures' model size; every task must still draw distinct answers there."""
    task = make_task(kind, MiniUcitConfig(n_train=40, n_test=10, image_size=size))
    assert Image.open(io.BytesIO(task.test[1].image)).size == (size, size)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("style-cls", set(SHAPES)),
        ("chart-qa", {"a", "b", "c", "d"}),
        ("icon-qa", {str(n) for n in range(1, 10)} | {"circle", "square", "triangle", "cross"}),
        ("count-math", NUMBER_WORDS),
    ],
)
def test_exact_match_answers_come_from_a_closed_set_and_are_not_degenerate(
    tasks: dict[str, TaskData], kind: str, expected: set[str]
) -> None:
    answers = Counter(s.answer for s in tasks[kind].train)
    assert set(answers) <= expected
    assert len(answers) >= 3
    assert answers.most_common(1)[0][1] < 0.5 * len(tasks[kind].train)  # no majority-class shortcut


@pytest.mark.parametrize("kind", sorted(CAPTION_PATTERNS))
def test_captions_follow_their_pattern_and_stay_short(tasks: dict[str, TaskData], kind: str) -> None:
    for sample in tasks[kind].train:
        assert re.fullmatch(CAPTION_PATTERNS[kind], sample.answer), sample.answer
        assert 1 <= len(words(sample.answer)) <= 8


def test_answers_are_one_to_eight_words(tasks: dict[str, TaskData]) -> None:
    for task in tasks.values():
        assert all(1 <= len(words(s.answer)) <= 8 for s in task.train + task.test)


def test_chart_answer_letter_names_the_tallest_or_shortest_bar(tasks: dict[str, TaskData]) -> None:
    for sample in tasks["chart-qa"].train:
        options = dict(re.findall(r"([a-d])\) (\w+)", sample.prompt))
        assert sample.answer in options and len(options) in (3, 4)
        assert set(options.values()) <= set(PALETTE)


def test_every_emitted_text_tokenises_into_the_vocabulary(tasks: dict[str, TaskData]) -> None:
    vocab = set(vocabulary())
    texts = [t for task in tasks.values() for s in task.train + task.test for t in (s.prompt, s.answer)]
    captions = pretrain_samples(SMALL, 560)[::2]  # the generic captions: every other sample
    texts += [t for s in captions for t in (s.prompt, s.answer)]
    emitted = {w for text in texts for w in words(text)}
    assert emitted <= vocab, emitted - vocab
    assert vocab == emitted  # the vocabulary lists nothing that no generator emits
    assert all(text == text.lower() for text in texts)
    assert vocabulary() == sorted(vocab) and not set("".join(vocab)) & set(PUNCTUATION)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("which bar? a) red b) blue.", ["which", "bar", "?", "a", ")", "red", "b", ")", "blue", "."]),
        ("choose: circle, square.", ["choose", ":", "circle", ",", "square", "."]),
        ("  two   words ", ["two", "words"]),
    ],
)
def test_tokenisation_rule(text: str, expected: list[str]) -> None:
    assert tokens(text) == expected


def test_prompt_formats_differ_between_tasks(tasks: dict[str, TaskData]) -> None:
    openings = {kind: {" ".join(words(s.prompt)[:3]) for s in task.train} for kind, task in tasks.items()}
    for a in UCIT_ORDER:
        for b in UCIT_ORDER:
            if a < b:
                assert not openings[a] & openings[b], (a, b)


def _thumbnail(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).resize((8, 8), Image.Resampling.BOX), dtype=np.float64).ravel()


def test_image_distributions_differ_between_tasks(tasks: dict[str, TaskData]) -> None:
    """1-nearest-neighbour on 8×8 thumbnails tells every task's test images from the other tasks' images."""
    train = np.stack([_thumbnail(s.image) for kind in UCIT_ORDER for s in tasks[kind].train])
    labels = np.repeat(np.arange(len(UCIT_ORDER)), SMALL.n_train)
    for label, kind in enumerate(UCIT_ORDER):
        test = np.stack([_thumbnail(s.image) for s in tasks[kind].test])
        nearest = ((test[:, None] - train[None]) ** 2).sum(-1).argmin(1)
        assert np.mean(labels[nearest] == label) >= 0.9, kind
    # but no task is a single solid colour tag: backgrounds vary within a task
    for kind in UCIT_ORDER:
        corners = np.stack([_pixels(s.image)[0, 0] for s in tasks[kind].train])
        assert corners.std(0).max() > 3.0, kind


def test_pretraining_mixes_generic_captions_of_every_image_kind_and_generic_questions(
    tasks: dict[str, TaskData],
) -> None:
    samples = pretrain_samples(SMALL, 70)
    assert [s.sample_id for s in samples[:2]] == ["pretrain/train/000000", "pretrain/train/000001"]
    captions, questions = samples[::2], samples[1::2]
    assert {s.prompt for s in captions} == {PRETRAIN_PROMPT} and PRETRAIN_PROMPT not in {s.prompt for s in questions}
    task_prompts = {s.prompt for t in tasks.values() for s in t.train}
    task_answers = {s.answer for t in tasks.values() for s in t.train}
    task_openings = {" ".join(words(p)[:3]) for p in task_prompts}
    assert not {s.prompt for s in samples} & task_prompts
    assert not {" ".join(words(s.prompt)[:3]) for s in samples} & task_openings
    assert not {s.answer for s in captions} & task_answers
    for generic in ("drawing of a shape", "a bar chart with", "low quality photo", "grid of icons", "gray floor",
                    "in a field"):
        assert any(generic in s.answer for s in captions), generic
    assert any(re.fullmatch(r"an? \w+ \w+ on a \w+ background", s.answer) for s in captions)
    # the questions: every skill, over shapes and colours of their own, never a task's shape
    for skill in ("what colour is the", "what object is", "how many", "count the", "read the character",
                  "is there a", "left or right?", "repeat:"):
        assert any(skill in s.prompt for s in pretrain_samples(SMALL, 200)[1::2]), skill
    assert not set(generic_data.SHAPES) & set(SHAPES) and set(PALETTE) < set(generic_data.COLOURS)
    named = {w for s in questions if not s.prompt.startswith("repeat") for w in words(s.prompt + " " + s.answer)}
    assert not named & set(SHAPES), named & set(SHAPES)
    answers = {s.answer for s in questions if not s.prompt.startswith("repeat")}
    allowed = {*generic_data.COLOURS, *generic_data.SHAPES, *NUMBER_WORDS, "six", *map(str, range(1, 7)),
               *generic_data.CHARACTERS, "yes", "no", "left", "right"}
    assert answers <= allowed, answers - allowed


def test_pretraining_text_holds_every_byte_utf8_can_hold() -> None:
    """The echo instruction cycles through generic.BYTE_COVER: at the default size every byte a UTF-8 string can
    contain (all but 0xC0, 0xC1, 0xF5–0xFF) is in the pretraining text."""
    samples = pretrain_samples(MiniUcitConfig(), DataConfig().pretrain_samples)
    seen = {b for s in samples for b in (s.prompt + s.answer).encode()}
    assert seen == set(range(0x100)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    assert all(s.answer == s.prompt.removeprefix("repeat: ") for s in samples if s.prompt.startswith("repeat"))


@pytest.mark.parametrize(
    ("kind", "message"),
    [("imagenet-r", "unknown mini-UCIT task kind 'imagenet-r'"), ("", "known kinds: style-cls, chart-qa")],
)
def test_unknown_kind_names_the_known_ones(kind: str, message: str) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        make_task(kind, SMALL)


def test_config_is_frozen_and_strict() -> None:
    with pytest.raises(ValueError, match="n_trian"):
        MiniUcitConfig(n_trian=5)
    with pytest.raises(ValueError, match="greater than 0"):
        MiniUcitConfig(n_test=0)


def test_default_size_task_generates_in_seconds() -> None:
    start = time.perf_counter()
    task = make_task("grounded-caption", MiniUcitConfig())
    seconds = time.perf_counter() - start
    assert (len(task.train), len(task.test)) == (800, 200)
    assert seconds < 10, f"800+200 samples took {seconds:.1f} s"
