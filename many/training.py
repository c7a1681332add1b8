"""Per-task fine-tuning: a PEFT LoRA on the language model plus a task-own projector (DESIGN.md §1, §2 finetune[t]).

From the frozen base, task t trains ΔW_t = s·B_t A_t (s = lora_alpha / r) on every targeted linear layer of the
language model and its own copy P_t of the vision→LLM projector, with the loss on answer tokens only:

    L = −(1/|answer tokens|) Σ log p(answer token | image, prompt, earlier answer tokens)

The base is deep-copied per task and never modified, so a trained projector cannot leak into the next task.
SeqLoRA (the forgetting lower bound) is the same trainer started from the previous task's adapter and projector.

The dataset is encoded once; mini-batches are drawn by index from seeded epoch permutations, so a run is
bit-identical on CPU for the same seed and data. AdamW with two parameter groups (LoRA, projector), linear warmup
then cosine decay, gradient accumulation, gradient clipping at 1.0, autocast when the base is bf16/fp16.
The generic loop (`encode_dataset`, `run_steps`) is shared with base pretraining (`many.model.pretrain`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many.adapters import CONFIG_FILE, write_portable_config
from many.config import FinetuneConfig, LoraConfig
from many.data.schema import Sample
from many.model.chat import IGNORE_INDEX, encode_for_training

# PEFT 0.21 still calls a transformers-5 deprecated property on every get_peft_model; nothing for us to change.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

PROJECTOR = "multi_modal_projector"
ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
MAX_GRAD_NORM = 1.0
ENCODE_CHUNK = 256  # samples per processor call while pre-encoding
StepCallback = Callable[[int, float], None]  # (optimizer step, mean loss over its micro-batches)
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


def max_positions(model: nn.Module) -> int:
    """The longest sequence the language model accepts; longer training samples are an error, not a truncation."""
    return int(model.config.text_config.max_position_embeddings)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and its compute dtype (the dtype of its frozen weights)."""
    parameter = next(model.parameters())
    dtypes = {p.dtype for p in model.parameters()}
    half = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    return parameter.device, half[0] if half else parameter.dtype


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
) -> None:
    """`steps` optimizer steps of `grad_accum` micro-batches each, on the model's own device.

    Autocast in the model's dtype when it is bf16/fp16 (fp16 with a GradScaler). Trains `model` in place:
    callers pass their own copy. The loss is read back (a device sync) only for the progress bar and `on_step`.
    `extra_loss(model)` is added to each micro-batch's loss; `before_step(model)` may rewrite the gradients
    (after unscaling, before clipping) — the hooks the continual-learning baselines need.
    """
    device, dtype = model_device_dtype(model)
    half = dtype in (torch.bfloat16, torch.float16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    indices = batch_indices(len(data), batch_size, seed)
    show = progress and sys.stderr.isatty()
    bar = tqdm(range(steps), desc=desc, disable=not show, dynamic_ncols=True)
    model.train()
    for step in bar:
        step_loss = torch.zeros((), device=device)
        for _ in range(grad_accum):
            batch = data.batch(next(indices), device)
            with torch.autocast(device.type, dtype=dtype, enabled=half):
                loss = model(**batch, use_cache=False).loss
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
            on_step(step, step_loss.item())
        if show and step % 10 == 0:
            bar.set_postfix(loss=f"{step_loss.item():.4f}")
    model.eval()


def projector_of(model: nn.Module) -> nn.Module:
    """The vision→LLM projector module, found by name whether or not PEFT wraps the model."""
    found = [module for name, module in model.named_modules() if name.split(".")[-1] == PROJECTOR]
    if len(found) != 1:
        raise ValueError(f"expected one `{PROJECTOR}` module in the model, found {len(found)}; is it a LLaVA?")
    return found[0]


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


def save_task(model: PeftModel, out_dir: Path) -> Path:
    """Write `out_dir/adapter/` (PEFT, safetensors) and `out_dir/projector.safetensors`.

    The files hold no local path: PEFT records where the base was loaded from (`base_model_name_or_path`,
    and a README model card), which would make equal adapters differ by machine and cache directory —
    and so every downstream cache key (DESIGN.md §2)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir / ADAPTER_DIR), safe_serialization=True)
    (out_dir / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
    config_path = out_dir / ADAPTER_DIR / CONFIG_FILE
    write_portable_config(config_path, config_path)
    state = {k: v.detach().cpu().contiguous() for k, v in projector_of(model).state_dict().items()}
    save_file(state, str(out_dir / PROJECTOR_FILE))
    return out_dir


def projector_state(task_dir: Path) -> dict[str, Tensor]:
    """A task's projector weights (keys as in the projector module, e.g. "linear_1.weight")."""
    path = Path(task_dir) / PROJECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no projector at {path}; is {task_dir} a directory written by save_task?")
    return load_file(str(path))


def load_task(base_model: LlavaForConditionalGeneration, task_dir: Path) -> PeftModel:
    """A copy of the base with the task's adapter and projector, in eval mode; the base is left unchanged."""
    adapter_dir = Path(task_dir) / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no PEFT adapter at {adapter_dir}; is {task_dir} a directory written by save_task?")
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir))
    projector_of(model).load_state_dict(projector_state(Path(task_dir)))
    return model.eval()
