"""CRAM's task-isolated experts: one LoRA expert + its own projector per task, trained from the base.

Training task t (old experts frozen on disk, never touched):

    1. Q_l  = orthonormal basis of the old experts' A row spaces            (rank.expert_bases)
    2. G_l  = ∂L_t/∂W0_l at the base;  R_l = G_l − G_l Q_l Q_lᵀ      (rank.estimate_gradients, rank.capability_gap)
    3. r_t  = clip(⌈ρ · r_gap⌉, r_min, r_max)                                (rank.allocate_rank)
    4. train a fresh rank-r_t LoRA + projector on  L_t + λ Σ_l ‖A_l Q_l‖_F²   (penalty.orthogonality_penalty)

On disk an expert is `many.adapters.save_task`'s layout plus `cram.json` ({"rank", "gap_ratio", "energy_rank"}),
written last so a directory with it is complete. Its routing centroid is the task's CPM prototype (the
prototypes[t] stage, `many.prototypes`): the same normalised mean of pooled vision features, so it is not stored
twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many.adapters import ADAPTER_DIR, lora_factors, projector_state, save_task
from many.config import FinetuneConfig
from many.data.schema import Sample
from many.methods.cram.config import CramConfig
from many.methods.cram.penalty import lora_A, orthogonality_penalty
from many.methods.cram.rank import (
    RankAllocation,
    allocate_rank,
    capability_gap,
    estimate_gradients,
    expert_bases,
)
from many.model.parts import model_device_dtype
from many.progress import StepCallback
from many.training import finetune

EXPERT_FILE = "cram.json"


@dataclass(frozen=True, eq=False)  # eq=False: a field-wise == on tensors has no truth value
class CramExpert:
    """A trained expert as the evaluation harness needs it."""

    factors: Mapping[str, tuple[Tensor, Tensor, float]]  # PEFT module name -> (B (out, r), A (r, in), scale)
    projector: Mapping[str, Tensor]  # projector state dict (keys as in multi_modal_projector)
    allocation: RankAllocation


def ranked_finetune(cfg: FinetuneConfig, rank: int) -> FinetuneConfig:
    """`cfg` with LoRA rank `rank` and alpha rescaled so that s = alpha / rank is the configured one."""
    scale = cfg.lora.alpha / cfg.lora.rank
    lora = cfg.lora.model_copy(update={"rank": rank, "alpha": scale * rank})
    return cfg.model_copy(update={"lora": lora})


def old_experts(previous: Sequence[Path]) -> list[dict[str, tuple[Tensor, Tensor, float]]]:
    """The LoRA factors of the previous experts' directories (written by save_expert or save_task)."""
    return [lora_factors(Path(task_dir) / ADAPTER_DIR) for task_dir in previous]


def train_expert(
    base_model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    cfg: CramConfig,
    previous: Sequence[Path] = (),
    *,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> tuple[PeftModel, RankAllocation]:
    """Task t's expert (steps 1–4 of the module docstring) and its rank allocation; the base is left unchanged.
    `on_step` gets every training step of step 4 (many.progress.Step).

    Returns the PEFT model frozen, in eval mode, its projector in the base dtype — as `many.training.finetune`.
    """
    bases = expert_bases(old_experts(previous))  # {} for the first task: no penalty
    gradients = estimate_gradients(base_model, processor, samples, cfg)
    allocation = allocate_rank(gradients, capability_gap(gradients, bases), cfg)
    device, _ = model_device_dtype(base_model)
    on_device = {layer: basis.to(device, torch.float32) for layer, basis in bases.items()}  # (in, k) each
    penalty = partial(_penalty, bases=on_device, weight=cfg.ortho_weight) if bases and cfg.ortho_weight else None
    model = finetune(base_model, processor, samples, ranked_finetune(cfg.finetune, allocation.rank),
                     progress=progress, on_step=on_step, extra_loss=penalty, desc="cram expert")
    return model, allocation


def _penalty(model: PeftModel, bases: Mapping[str, Tensor], weight: float) -> Tensor:
    return orthogonality_penalty(lora_A(model), bases, weight)


def save_expert(model: PeftModel, allocation: RankAllocation, out_dir: Path) -> Path:
    """`save_task`'s adapter + projector, then cram.json (last: its presence marks a complete expert)."""
    save_task(model, Path(out_dir))
    record = {"rank": allocation.rank, "gap_ratio": allocation.gap_ratio, "energy_rank": allocation.energy_rank}
    (Path(out_dir) / EXPERT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return Path(out_dir)


def load_expert(task_dir: Path) -> CramExpert:
    """A saved expert's factors, projector and allocation; the adapter's rank must be the recorded one."""
    path = Path(task_dir) / EXPERT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {EXPERT_FILE} in {task_dir}; is it a directory written by save_expert?")
    record = json.loads(path.read_text())
    if set(record) != {"rank", "gap_ratio", "energy_rank"}:
        raise ValueError(f"{path}: keys {sorted(record)}, expected energy_rank, gap_ratio, rank")
    allocation = RankAllocation(int(record["rank"]), float(record["gap_ratio"]), float(record["energy_rank"]))
    factors = lora_factors(Path(task_dir) / ADAPTER_DIR)
    ranks = {A.shape[0] for _, A, _ in factors.values()}
    if ranks != {allocation.rank}:
        raise ValueError(f"{path}: records rank {allocation.rank} but the adapter has ranks {sorted(ranks)}")
    return CramExpert(factors, projector_state(Path(task_dir)), allocation)


def trainable_parameters(expert: CramExpert) -> dict[str, int]:
    """Parameters the expert added: Σ_l r (in + out) of its LoRA, its projector, and their total."""
    lora = sum(B.numel() + A.numel() for B, A, _ in expert.factors.values())
    projector = sum(value.numel() for value in expert.projector.values())
    return {"lora": lora, "projector": projector, "total": lora + projector}
