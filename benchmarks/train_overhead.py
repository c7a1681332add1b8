"""Trainer overhead: steps/s of `many.training.finetune` vs a bare PyTorch loop (docs/design.md §8 timings).

Both train the same PEFT model (`many.training.prepare`) on the same pre-encoded batches with the same AdamW;
the bare loop drops the schedule, clipping, grad scaler and progress bar. Runs alternate (finetune, bare) for
`--repeats` rounds and the median rate of each is compared: goal ratio ≥ 0.9. Also reports the projected time of
a 600-step task fine-tune and base pretraining steps/s, all on the default tiny model (`TinyModelConfig()`).

    python -m benchmarks.train_overhead [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from many.config import BaseConfig, FinetuneConfig, TinyModelConfig
from many.data.draw import png_bytes
from many.data.schema import Sample
from many.loop import batch_indices, encode_dataset
from many.model.parts import max_positions
from many.model.tiny import build_tiny_llava
from many.pretrain import pretrain
from many.training import finetune, make_optimizer, prepare

GOAL_RATIO = 0.9
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
VOCAB = (*COLOURS, "what", "colour", "is", "the", "box", "a", "on", "grey", "background")


def synthetic_samples(n: int, size: int, seed: int = 0) -> tuple[Sample, ...]:
    """n images of one coloured box; the answer is a short caption naming its colour."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        pixels = np.full((size, size, 3), 128, dtype=np.uint8)
        x, y = rng.integers(0, size // 2, size=2)
        pixels[y : y + size // 2, x : x + size // 2] = COLOURS[colour]
        image = png_bytes(Image.fromarray(pixels))
        samples.append(Sample(f"bench/{i}", image, "what colour is the box?", f"a {colour} box on a grey background"))
    return tuple(samples)


def finetune_rate(model, processor, samples, cfg: FinetuneConfig) -> float:
    """Steps/s of `finetune`, timed between the first and last step callbacks (setup excluded)."""
    stamps: list[float] = []
    finetune(model, processor, samples, cfg, progress=False, on_step=lambda *_: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bare_rate(model, processor, samples, cfg: FinetuneConfig) -> float:
    """Steps/s of a plain forward/backward/AdamW loop over the same model, batches and optimizer."""
    torch.manual_seed(cfg.seed)
    peft_model = prepare(model, cfg)
    optimizer = make_optimizer(peft_model, cfg)
    data = encode_dataset(processor, samples, max_positions(model))
    indices = batch_indices(len(data), cfg.batch_size, cfg.seed)
    device = next(model.parameters()).device
    peft_model.train()
    stamps = []
    for _ in range(cfg.steps):
        loss = peft_model(**data.batch(next(indices), device), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        loss.item()  # the same one sync per step as finetune's step callback
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def pretrain_rate(model, processor, samples, cfg: BaseConfig) -> float:
    """Steps/s of base pretraining, whole call minus the one-off encoding of the captions."""
    start = time.perf_counter()
    encode_dataset(processor, samples, max_positions(model))
    encoding = time.perf_counter() - start
    start = time.perf_counter()
    pretrain(model, processor, samples, cfg, progress=False)
    return cfg.pretrain_steps / (time.perf_counter() - start - encoding)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, to check the script runs")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating (finetune, bare) rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared box)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    steps, repeats, pretrain_steps = (4, 1, 3) if args.smoke else (args.steps, args.repeats, 20)
    torch.set_num_threads(args.threads)

    tiny = TinyModelConfig()
    model, processor = build_tiny_llava(tiny, VOCAB, seed=0)
    model = model.eval().requires_grad_(False)
    samples = synthetic_samples(256, tiny.image_size)
    cfg = FinetuneConfig(steps=steps, batch_size=16)
    finetune_rates, bare_rates = [], []
    for _ in range(repeats):
        finetune_rates.append(finetune_rate(model, processor, samples, cfg))
        bare_rates.append(bare_rate(model, processor, samples, cfg))
    start = time.perf_counter()
    prepare(model, cfg)
    encode_dataset(processor, samples, max_positions(model))
    setup_seconds = time.perf_counter() - start  # per-task copy + PEFT wrap + encoding, outside the step timing
    base_cfg = BaseConfig(tiny=tiny, pretrain_steps=pretrain_steps, device="cpu")
    finetune_steps_per_s = statistics.median(finetune_rates)
    result = {
        "model": "TinyModelConfig() defaults", "batch_size": cfg.batch_size, "threads": args.threads,
        "steps_per_run": steps, "repeats": repeats,
        "finetune_steps_per_s": finetune_steps_per_s,
        "bare_steps_per_s": statistics.median(bare_rates),
        "ratio": finetune_steps_per_s / statistics.median(bare_rates),
        "goal_ratio": GOAL_RATIO,
        "finetune_rates": finetune_rates, "bare_rates": bare_rates,
        "finetune_600_steps_s": 600 / finetune_steps_per_s + setup_seconds,
        "pretrain_batch_size": base_cfg.pretrain_batch_size,
        "pretrain_steps_per_s": pretrain_rate(model, processor, samples, base_cfg),
    }
    result["pretrain_1500_steps_s"] = 1500 / result["pretrain_steps_per_s"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
