"""Shared fixtures: one tiny multimodal model (built from config in a second), tiny samples, the moto S3
server of tests/s3.py, and a Prefect test harness for the end-to-end modules."""

from __future__ import annotations

import io
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image

from many.config import BaseConfig, TinyModelConfig
from many.data.schema import Sample
from many.model.chat import sequence_text
from tests.s3 import faulty_s3, new_bucket, s3_endpoint  # noqa: F401 - fixtures for every test directory

torch.set_num_threads(1)  # the suite shares 2 cores; tiny tensors gain nothing from more threads

# 16 px images, patch 4 → 16 image tokens; a few hundred kB of weights.
FIXTURE_MODEL = TinyModelConfig(
    image_size=16, patch_size=4, vision_hidden=32, vision_layers=2, vision_heads=2,
    text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64, max_length=64,
)
FIXTURE_BASE = BaseConfig(tiny=FIXTURE_MODEL, pretrain_steps=0, device="cpu")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square")


def _png(colour: tuple[int, int, int], shape: str, size: int, rng: np.random.Generator) -> bytes:
    pixels = np.full((size, size, 3), 245, dtype=np.uint8)
    lo, hi = size // 4, 3 * size // 4
    if shape == "square":
        pixels[lo:hi, lo:hi] = colour
    else:
        yy, xx = np.mgrid[:size, :size]
        pixels[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 4) ** 2] = colour
    noise = rng.integers(0, 12, size=pixels.shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels.astype(int) - noise, 0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_samples(n: int, question: str = "colour", seed: int = 0, size: int = 16) -> tuple[Sample, ...]:
    """n samples of a coloured shape; question "colour" or "shape" decides the asked attribute."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        prompt = "what colour is the shape?" if question == "colour" else "what is the shape?"
        answer = colour if question == "colour" else shape
        samples.append(Sample(f"{question}/{seed}/{i:04d}", _png(COLOURS[colour], shape, size, rng), prompt, answer))
    return tuple(samples)


# The fixture tokenizer's training text: the fixture samples' own sequences, so every answer word is one token.
FIXTURE_TEXTS = tuple(sequence_text(s) for question in ("colour", "shape") for s in make_samples(32, question, seed=0))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved, randomly initialised tiny LLaVA dir (an ordinary HF checkpoint)."""
    from many.model.load import save_base
    from many.model.tiny import build_tiny_llava

    model, processor = build_tiny_llava(FIXTURE_MODEL, FIXTURE_TEXTS, seed=0)
    return save_base(model, processor, tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture()
def tiny_base(tiny_base_dir: Path):
    """A fresh (model, processor) loaded from the session checkpoint: tests may mutate it freely."""
    from many.model.load import load_base

    return load_base(tiny_base_dir, FIXTURE_BASE)


@pytest.fixture(scope="session")
def pretrained_base_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture model briefly pretrained on shape answers: a random output head caps what a LoRA can learn."""
    from many.model.load import load_base, save_base
    from many.pretrain import pretrain

    model, processor = load_base(tiny_base_dir, FIXTURE_BASE)
    cfg = FIXTURE_BASE.model_copy(update={"pretrain_steps": 30, "pretrain_batch_size": 8, "pretrain_lr": 1e-2})
    trained = pretrain(model, processor, make_samples(32, "shape", seed=5), cfg, progress=False)
    return save_base(trained, processor, tmp_path_factory.mktemp("pretrained-base"))


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    """A Prefect test harness (its own temporary server and database) for one test module, and private caches
    for Ray and the store."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("MANY_CACHE_DIR", str(tmp_path_factory.mktemp("many-cache")))
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-many-test")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    with prefect_test_harness(server_startup_timeout=90):
        yield


def two_task_stages(base_dir: Path, root: Path, stats, **finetune) -> dict[str, Path]:
    """Stage outputs of two fixture tasks ("colour", "shape") on the base at `base_dir`, under `root`: data<t>,
    finetune<t> (rank-2 LoRA, `finetune` overriding FinetuneConfig's fields, seed t) and all-token grams<t>."""
    from many.config import FinetuneConfig, LoraConfig
    from many.data import write_task
    from many.data.schema import TaskData
    from tasks.stages import FinetuneStageConfig, StatsStageConfig, compute_finetune, compute_stats

    out = {"base": base_dir}
    for t, question in enumerate(("colour", "shape")):
        data = root / f"data{t}"
        write_task(TaskData(question, "exact_match", make_samples(12, question, seed=t), make_samples(4, question, seed=9)), data)
        (root / f"finetune{t}").mkdir()
        config = FinetuneConfig(**{"lora": LoraConfig(rank=2, alpha=4.0), "batch_size": 4, "seed": t, **finetune})
        task = compute_finetune({"base": base_dir, "data": data}, root / f"finetune{t}", device="cpu",
                                config=FinetuneStageConfig(finetune=config))["task"]
        (root / f"stats{t}").mkdir()
        grams = compute_stats({"base": base_dir, "data": data, "finetune": task}, root / f"stats{t}",
                              config=StatsStageConfig(stats=stats), device="cpu")["grams"]
        out |= {f"data{t}": data, f"finetune{t}": task, f"grams{t}": grams}
    return out
