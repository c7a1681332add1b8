"""The generic training loop, shared by base pretraining (`many.pretrain`) and task fine-tuning (`many.training`,
the continual-learning baselines): encode a dataset once, draw mini-batches from seeded epochs, run optimizer steps.

The dataset is encoded once and right-padded; mini-batches are drawn by index from seeded epoch permutations, so a
run is bit-identical on CPU for the same seed and data. Each step accumulates `grad_accum` micro-batches, clips the
gradient norm at 1.0 and steps the optimizer and its schedule (`warmup_cosine`: linear warmup, then cosine decay),
under autocast when the model is bf16/fp16. Nothing here knows LoRA, PEFT or a projector.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlavaProcessor

from many.data.schema import Sample
from many.model.chat import IGNORE_INDEX, encode_for_training
from many.model.parts import model_device_dtype
from many.progress import Step, StepCallback

MAX_GRAD_NORM = 1.0
ENCODE_CHUNK = 256  # samples per processor call while pre-encoding
LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]  # (model, batch) → the mean loss of the batch
ExtraLoss = Callable[[nn.Module], Tensor]  # a regulariser added to every micro-batch loss (e.g. CRAM's penalty)
GradientHook = Callable[[nn.Module], None]  # edits .grad in place before each optimizer step (e.g. Fwd-Prompt)


@dataclass(frozen=True, eq=False)  # eq=False: a field-wise == on tensors has no truth value
class Encoded:
    """A dataset encoded once, right-padded to one length L; a mini-batch is trimmed to its own longest row."""

    input_ids: Tensor  # (N, L)
    attention_mask: Tensor  # (N, L)
    labels: Tensor  # (N, L), IGNORE_INDEX off the answer tokens
    pixel_values: Tensor  # (N, 3, H, W)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: Tensor, device: torch.device) -> dict[str, Tensor]:
        """Rows `index` (B,), cut to their longest sequence: right padding makes the cut exact."""
        length = int(self.attention_mask[index].sum(dim=1).max())
        return {
            "input_ids": self.input_ids[index, :length].to(device),
            "attention_mask": self.attention_mask[index, :length].to(device),
            "labels": self.labels[index, :length].to(device),
            "pixel_values": self.pixel_values[index].to(device),
        }


def encode_dataset(processor: LlavaProcessor, samples: Sequence[Sample], max_length: int | None = None) -> Encoded:
    """Encode every sample once (answer-only labels), in chunks, padded to the longest sequence overall."""
    if not samples:
        raise ValueError("no training samples: the sample list is empty; check the task's train split")
    chunks = [
        encode_for_training(processor, samples[i : i + ENCODE_CHUNK], max_length)
        for i in range(0, len(samples), ENCODE_CHUNK)
    ]
    length = max(chunk["input_ids"].shape[1] for chunk in chunks)
    fill = {"input_ids": processor.tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}

    def padded(key: str) -> Tensor:  # (N, L)
        return torch.cat([F.pad(c[key], (0, length - c[key].shape[1]), value=fill[key]) for c in chunks])

    return Encoded(
        input_ids=padded("input_ids"),
        attention_mask=padded("attention_mask"),
        labels=padded("labels"),
        pixel_values=torch.cat([chunk["pixel_values"] for chunk in chunks]),
    )


def model_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's own loss: the mean next-token cross-entropy over the labelled positions."""
    return model(**batch, use_cache=False).loss


def answer_positions(labels: Tensor) -> Tensor:
    """(B, L) bool: the positions whose next token is labelled (position p predicts token p + 1), i.e. the positions
    whose outputs the answer loss reads."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def answer_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The same loss as `model_loss`, −(1/|A|) Σ_{(b,p)∈A} log softmax(W h_{b,p})[y_{b,p+1}] over A = the positions whose
    next token is labelled, with the output head W applied to those positions only (`logits_to_keep`, a boolean
    (B, L) mask) instead of all L: the head's cost no longer grows with the image and prompt tokens."""
    labels = batch["labels"]  # (B, L)
    keep = answer_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (|A|, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:][keep[:, :-1]])


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless seeded epochs: each a random permutation of range(n), cut into (batch_size,) index tensors."""
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:  # a batch may straddle two epochs (and n may be < batch_size)
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """lr factor: (step+1)/warmup during warmup, then ½(1 + cos(π·p)), p = (step − warmup)/(total − warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNGs (LoRA init, dropout) seeded, restoring them afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    grad_accum: int,
    seed: int,
    progress: bool = True,
    desc: str = "train",
    on_step: StepCallback | None = None,
    extra_loss: ExtraLoss | None = None,
    before_step: GradientHook | None = None,
    loss_fn: LossFn = model_loss,
) -> None:
    """`steps` optimizer steps of `grad_accum` micro-batches each, on the model's own device.

    Autocast in the model's dtype when it is bf16/fp16 (fp16 with a GradScaler). Trains `model` in place:
    callers pass their own copy. The loss is read back (a device sync) only for the progress bar and `on_step`.
    `extra_loss(model)` is added to each micro-batch's loss; `before_step(model)` may rewrite the gradients
    (after unscaling, before clipping) — the hooks the continual-learning baselines need. `on_step` gets every
    step as a `many.progress.Step` (steps done of `steps`, loss, the learning rate it used, seconds so far).
    `loss_fn(model, batch)` is the micro-batch's loss (`model_loss`, or `answer_loss`: the same value, cheaper).
    """
    device, dtype = model_device_dtype(model)
    half = dtype in (torch.bfloat16, torch.float16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    indices = batch_indices(len(data), batch_size, seed)
    show = progress and sys.stderr.isatty()
    bar = tqdm(range(steps), desc=desc, disable=not show, dynamic_ncols=True)
    model.train()
    started = time.monotonic()
    for step in bar:
        lr = float(optimizer.param_groups[0]["lr"])  # what this step uses: the schedule moves it after the step
        step_loss = torch.zeros((), device=device)
        for _ in range(grad_accum):
            batch = data.batch(next(indices), device)
            with torch.autocast(device.type, dtype=dtype, enabled=half):
                loss = loss_fn(model, batch)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                loss = loss / grad_accum
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        scaler.unscale_(optimizer)
        if before_step is not None:
            before_step(model)
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if on_step is not None:
            on_step(Step(step + 1, steps, step_loss.item(), lr, time.monotonic() - started))
        if show and step % 10 == 0:
            bar.set_postfix(loss=f"{step_loss.item():.4f}")
    model.eval()

