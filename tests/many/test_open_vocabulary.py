"""The tiny base's open vocabulary (docs/design.md §7): a user's LLaVA-JSON task whose answers are words mini-UCIT
never uses runs on base.kind 'tiny' through the data, base and finetune stages, and learns them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from many.config import BaseConfig, EvalConfig, FinetuneConfig, LoraConfig
from many.data import MiniUcitConfig, pretrain_samples, read_task, vocabulary, words
from many.evaluate import evaluate
from many.model.load import load_base
from tasks.stages import (
    BaseStageConfig,
    DataStageConfig,
    FinetuneStageConfig,
    compute_base,
    compute_data,
    compute_finetune,
)
from tests.conftest import FIXTURE_MODEL

# Three picture cards, each named by a word no mini-UCIT text (task or pretraining) contains.
CARDS = {"zebra": "stripes", "mango": (250, 140, 20), "quokka": (120, 70, 40)}
PROMPT = "<image>\nwhich card is this? name it."
MINI = MiniUcitConfig(n_train=8, n_test=8, image_size=FIXTURE_MODEL.image_size)
# A small mixture, but pretrained long enough (its vocabulary drill ~30 times over) that every output row is trained:
# the LoRA cannot train the frozen output head, and a base pretrained for a few steps caps it near chance.
BASE = BaseStageConfig(
    base=BaseConfig(tiny=FIXTURE_MODEL, pretrain_steps=400, pretrain_batch_size=32, pretrain_lr=1e-2, device="cpu"),
    mini_ucit=MINI, pretrain_samples=32,
)
FINETUNE = FinetuneConfig(lora=LoraConfig(rank=8, alpha=16.0), steps=150, batch_size=8, lr=1e-2, projector_lr=1e-2,
                          warmup_steps=4)


def _card(word: str, rng: np.random.Generator, size: int) -> Image.Image:
    pixels = np.full((size, size, 3), 235.0) + rng.normal(0, 6, size=(size, size, 1))
    lo, hi = int(rng.integers(1, 4)), size - int(rng.integers(1, 4))
    if CARDS[word] == "stripes":
        pixels[lo:hi, lo:hi] = 20.0
        pixels[lo:hi, lo:hi][:, ::3] = 240.0
    else:
        pixels[lo:hi, lo:hi] = np.asarray(CARDS[word], dtype=float) + rng.normal(0, 10, size=3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_split(root: Path, split: str, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        word = list(CARDS)[i % len(CARDS)]
        _card(word, rng, FIXTURE_MODEL.image_size).save(root / f"{split}-{i}.png")
        records.append({"id": f"{split}-{i}", "image": f"{split}-{i}.png",
                        "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": word}]})
    path = root / f"{split}.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cards")
    data = DataStageConfig(name="cards", train_json=str(_write_split(root, "train", 60, 0)),
                           test_json=str(_write_split(root, "test", 30, 1)), image_root=str(root))
    task = compute_data({}, tmp_path_factory.mktemp("data"), config=data, device="cpu")["task"]
    base = compute_base({}, tmp_path_factory.mktemp("base"), config=BASE, device="cpu")["model"]
    tuned = compute_finetune({"base": base, "data": task}, tmp_path_factory.mktemp("finetune"),
                             config=FinetuneStageConfig(finetune=FINETUNE), device="cpu")["task"]
    return {"data": task, "base": base, "finetune": tuned}


def test_the_card_words_are_new_to_mini_ucit() -> None:
    pretraining = {w for s in pretrain_samples(MINI, BASE.pretrain_samples) for w in words(s.prompt + " " + s.answer)}
    assert not set(CARDS) & (set(vocabulary()) | pretraining)


@pytest.mark.slow  # ~1 min on 2 busy cores: pretraining the base is most of it
def test_a_task_of_new_words_learns_them_on_the_tiny_base(stages: dict[str, Path]) -> None:
    from many.adapters import load_task

    task = read_task(stages["data"])
    model, processor = load_base(stages["base"], BaseConfig(device="cpu"))
    assert all(processor.tokenizer.decode(processor.tokenizer.encode(w)) == w for w in CARDS)  # no <unk>, no loss
    zero_shot = evaluate(model, processor, task, EvalConfig(max_new_tokens=8))
    tuned = evaluate(load_task(model, stages["finetune"]), processor, task, EvalConfig(max_new_tokens=8))
    chance = 100 / len(CARDS)
    assert zero_shot.score < chance  # the base never saw the words
    assert tuned.score >= chance + 25 and tuned.score >= zero_shot.score + 50, tuned.predictions[:6]
    right = {reference for _, prediction, reference in tuned.predictions if prediction == reference}
    assert right == set(CARDS)  # every new word is written out in full somewhere
