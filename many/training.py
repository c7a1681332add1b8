"""Per-task fine-tuning: a PEFT LoRA on the language model plus a task-own projector (docs/design.md §1, §2 finetune[t]).

From the frozen base, task t trains ΔW_t = s·B_t A_t (s = lora_alpha / r) on every targeted linear layer of the
language model and its own copy P_t of the vision→LLM projector, with the loss on answer tokens only:

    L = −(1/|answer tokens|) Σ log p(answer token | image, prompt, earlier answer tokens)

The base is deep-copied per task and never modified, so a trained projector cannot leak into the next task.
SeqLoRA (the forgetting lower bound) is the same trainer started from the previous task's adapter and projector.

AdamW with two parameter groups (LoRA, projector), linear warmup then cosine decay, gradient accumulation, gradient
clipping at 1.0, autocast when the base is bf16/fp16 — the generic loop of `many.loop`, shared with base
pretraining (`many.pretrain`). The trained task is written and read back as a task directory (`many.adapters`:
`save_task`, `load_task`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import peft
import torch
from peft import PeftModel
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many.adapters import ADAPTER_DIR, projector_state
from many.config import FinetuneConfig, LoraConfig
from many.data.schema import Sample
from many.loop import ExtraLoss, StepCallback, encode_dataset, run_steps, seeded, warmup_cosine
from many.model.parts import PROJECTOR, max_positions, model_device_dtype, projector_of

# PEFT 0.21 still calls a transformers-5 deprecated property on every get_peft_model; nothing for us to change.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def peft_lora_config(cfg: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules
    )


def _check_continuation(adapter_dir: Path, cfg: LoraConfig) -> None:
    """SeqLoRA continues the previous adapter as it is, so its LoRA shape must be the configured one."""
    saved = peft.LoraConfig.from_pretrained(str(adapter_dir))
    wanted = peft_lora_config(cfg)
    differs = [k for k in ("r", "lora_alpha", "target_modules") if getattr(saved, k) != getattr(wanted, k)]
    if differs:
        raise ValueError(f"init_dir adapter {adapter_dir} differs from finetune.lora in {differs}; "
                         "SeqLoRA must continue with the same LoRA config")


def prepare(base_model: LlavaForConditionalGeneration, cfg: FinetuneConfig, init_dir: Path | None = None) -> PeftModel:
    """A trainable copy of the base: fresh LoRA (or `init_dir`'s adapter + projector), projector unfrozen in fp32.

    Seed the global RNG first (see `seeded`): PEFT initialises A with it.
    """
    model = copy.deepcopy(base_model)
    if init_dir is None:
        peft_model = peft.get_peft_model(model, peft_lora_config(cfg.lora))
    else:
        _check_continuation(Path(init_dir) / ADAPTER_DIR, cfg.lora)
        peft_model = PeftModel.from_pretrained(model, str(Path(init_dir) / ADAPTER_DIR), is_trainable=True)
        projector_of(peft_model).load_state_dict(projector_state(Path(init_dir)))
    projector = projector_of(peft_model).float()  # fp32 master weights; autocast computes in the base dtype
    for parameter in projector.parameters():
        parameter.requires_grad_(True)  # PEFT froze it with the rest of the base
    return peft_model


def make_optimizer(model: PeftModel, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with two groups: LoRA factors at cfg.lr, the projector at cfg.projector_lr."""
    lora, projector, other = [], [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (projector if f".{PROJECTOR}." in name else lora if ".lora_" in name else other).append(name)
    if other:
        raise ValueError(f"unexpected trainable parameters {other[:3]}…; only LoRA and the projector may train")
    params = dict(model.named_parameters())
    return torch.optim.AdamW(
        [{"params": [params[n] for n in lora], "lr": cfg.lr},
         {"params": [params[n] for n in projector], "lr": cfg.projector_lr}],
        weight_decay=cfg.weight_decay,
    )


def finetune(
    base_model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    cfg: FinetuneConfig,
    *,
    init_dir: Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
    extra_loss: ExtraLoss | None = None,
    desc: str = "finetune",
) -> PeftModel:
    """Train one task's LoRA + projector from `base_model` (left unchanged); `init_dir` = SeqLoRA continuation.

    Returns the PEFT model frozen, in eval mode, its projector cast back to the base dtype (what `load_task` rebuilds).
    `extra_loss(model)` is added to the task loss at every micro-batch (CRAM's orthogonality penalty).
    """
    data = encode_dataset(processor, samples, max_positions(base_model))
    device, dtype = model_device_dtype(base_model)
    with seeded(cfg.seed, device):
        model = prepare(base_model, cfg, init_dir)
        optimizer = make_optimizer(model, cfg)
        schedule = partial(warmup_cosine, warmup=cfg.warmup_steps, total=cfg.steps)
        run_steps(
            model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), data,
            steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
            progress=progress, desc=desc, on_step=on_step, extra_loss=extra_loss,
        )
    projector_of(model).to(dtype)
    return model.requires_grad_(False)

