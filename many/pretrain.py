"""The `base` stage (docs/design.md §2, §7): the embedded tiny LLaVA pretrained on a generic instruction mixture and
its vocabulary drill (many.vocab_drill), or a HF LLaVA copied to a local dir, so every downstream stage reads an
ordinary HF checkpoint from disk.

Pretraining is full-parameter next-token training with the loss on the answer tokens only (`many.loop.answer_loss`),
AdamW at `pretrain_lr`, 5 % linear warmup then cosine decay, in fp32 (the saved checkpoint is cast to
`dtype` when loaded). docs/design.md §8: the from-scratch vision tower is the quality bottleneck, so a longer
pretraining helps every method. The step loop is `many.loop`'s, the one task fine-tuning runs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many.config import BaseConfig
from many.data.schema import Sample
from many.loop import StepCallback, answer_loss, encode_dataset, run_steps, seeded, warmup_cosine
from many.model.chat import sequence_text
from many.model.load import load_base, resolve_device, save_base
from many.model.parts import max_positions, model_device_dtype
from many.model.tiny import build_tiny_llava
from many.vocab_drill import vocabulary_drill

WARMUP_FRACTION = 0.05


def pretrain(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    cfg: BaseConfig,
    *,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> LlavaForConditionalGeneration:
    """A copy of `model` trained on `samples` for cfg.pretrain_steps steps (every parameter); eval mode.
    `on_step` gets every step (many.progress.Step)."""
    trained = copy.deepcopy(model)
    if cfg.pretrain_steps == 0:
        return trained.eval()
    data = encode_dataset(processor, samples, max_positions(model))
    device, _ = model_device_dtype(model)
    with seeded(cfg.seed, device):
        trained.requires_grad_(True)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.pretrain_lr)
        schedule = partial(warmup_cosine, warmup=int(WARMUP_FRACTION * cfg.pretrain_steps), total=cfg.pretrain_steps)
        run_steps(
            trained, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), data,
            steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size, grad_accum=1, seed=cfg.seed,
            progress=progress, desc="pretrain", on_step=on_step, loss_fn=answer_loss,
        )
    return trained.requires_grad_(False)


def make_base(
    cfg: BaseConfig,
    samples: Sequence[Sample],
    out_dir: Path,
    *,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> Path:
    """Write the base HF dir: kind "tiny" → build (its byte-level BPE tokenizer trained on the text of `samples`)
    + pretrain on `samples` (fp32) + save; kind "hf" → load `hf_id` + save. `on_step` gets every pretraining step
    (none for kind "hf")."""
    if cfg.kind == "hf":
        if not cfg.hf_id:
            raise ValueError("base.kind is 'hf' but base.hf_id is not set; give a hub id or a local HF LLaVA dir")
        model, processor = load_base(cfg.hf_id, cfg)
        return save_base(model, processor, out_dir)
    if not samples:
        raise ValueError("no training samples: the tiny base needs pretraining samples (data.pretrain_samples)")
    model, processor = build_tiny_llava(cfg.tiny, [sequence_text(s) for s in samples], seed=cfg.seed)
    samples = (*samples, *vocabulary_drill(processor.tokenizer, samples))
    trained = pretrain(model.to(resolve_device(cfg.device)), processor, samples, cfg, progress=progress, on_step=on_step)
    return save_base(trained.cpu(), processor, out_dir)
