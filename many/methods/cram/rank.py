"""CRAM adaptive-rank instantiation: how much of a new task the existing experts do not already cover.

For every LoRA-targeted weight W0 (out, in), the new task's loss gradient at the base, G = ∂L/∂W0 (out, in), is
split into what the existing experts' input subspaces already span and the capability gap

    R = G − G Q Qᵀ,     Q (in, k) = orthonormal basis of the row spaces of the old experts' A_i (r_i, in)

and the new expert's rank is read from R's spectrum σ_1 ≥ σ_2 ≥ …:

    r_l   = min { r : Σ_{j≤r} σ_j² ≥ energy · Σ_j σ_j² }         per layer l
    r_gap = Σ_l (‖R_l‖² / Σ_m ‖R_m‖²) · r_l                        weighted by the layers' gap energy
    ρ     = Σ_l ‖R_l‖² / Σ_l ‖G_l‖²                                 the share of the gradient not yet spanned
    rank  = clip(⌈ρ · r_gap⌉, r_min, r_max)

A task whose gradient the old experts span has a small gap (ρ → 0) and gets r_min; the first task (no experts,
ρ = 1) gets the rank its own gradient spectrum asks for. This is our reading of CRAM's "identify the capability
gap between existing expert capability and new task demands, and dynamically allocate only the necessary
parameters"; the paper's exact estimator is not public here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many.data.schema import Sample
from many.loop import batch_indices, encode_dataset
from many.methods.cram.config import CramConfig
from many.model.parts import PEFT_PREFIX, max_positions, model_device_dtype

BASIS_TOLERANCE = 1e-6  # singular values below this share of the largest are not part of a span
ORTHONORMAL_TOLERANCE = 1e-4  # max |QᵀQ − I| accepted from a caller's basis
GAP_TOLERANCE = 1e-12  # ρ below this is projection round-off, not a capability gap


@dataclass(frozen=True)
class RankAllocation:
    """The allocated rank and why: ρ (unspanned share of the gradient energy) and r_gap (energy-weighted r_l)."""

    rank: int
    gap_ratio: float  # ρ
    energy_rank: float  # r_gap


def targeted_linears(model: LlavaForConditionalGeneration, target_modules: str) -> dict[str, nn.Linear]:
    """The base's linear layers PEFT would wrap for `target_modules` (re.fullmatch), keyed by PEFT module name."""
    layers = {
        PEFT_PREFIX + name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(target_modules, name)
    }
    if not layers:
        raise ValueError(f"CRAM: no linear layer of the base matches target_modules {target_modules!r}")
    return layers


def expert_bases(experts: Sequence[Mapping[str, tuple[Tensor, Tensor, float]]]) -> dict[str, Tensor]:
    """Q (in, k) float64 per layer: an orthonormal basis of the row spaces of every expert's A (r_i, in).

    `experts` are `many.adapters.lora_factors` of the old experts ({module: (B, A, scale)}); no experts → {}.
    k = the numerical rank of the stacked A's (singular values above BASIS_TOLERANCE of the largest).
    """
    if not experts:
        return {}
    layers = set(experts[0])
    for index, factors in enumerate(experts):
        if set(factors) != layers:
            raise ValueError(f"CRAM expert_bases: expert {index} adapts other layers than expert 0 "
                             f"({sorted(set(factors) ^ layers)[:3]}); all experts need the same target_modules")
    bases = {}
    for layer in sorted(layers):
        stacked = torch.cat([factors[layer][1].to(torch.float64) for factors in experts])  # (Σ r_i, in)
        _, singular, vh = torch.linalg.svd(stacked, full_matrices=False)  # vh: (min(Σr, in), in)
        k = int((singular > BASIS_TOLERANCE * singular[0]).sum()) if singular[0] > 0 else 0
        bases[layer] = vh[:k].T.contiguous()  # (in, k)
    return bases


def _check_basis(layer: str, basis: Tensor, columns: int) -> None:
    if basis.ndim != 2 or basis.shape[0] != columns:
        raise ValueError(f"CRAM: layer {layer!r}: basis has shape {tuple(basis.shape)}, expected ({columns}, k)")
    gram = basis.to(torch.float64).T @ basis.to(torch.float64)  # (k, k)
    if not torch.allclose(gram, torch.eye(basis.shape[1], dtype=torch.float64), atol=ORTHONORMAL_TOLERANCE):
        raise ValueError(f"CRAM: layer {layer!r}: basis columns are not orthonormal; build it with expert_bases")


def capability_gap(gradients: Mapping[str, Tensor], bases: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """R = G − G Q Qᵀ (out, in) float64 per layer; `bases` {} (no old experts) → R = G."""
    if bases and set(bases) != set(gradients):
        differ = sorted(set(bases) ^ set(gradients))[:3]
        raise ValueError(f"CRAM capability_gap: gradient and basis layers differ ({differ}); "
                         "old and new experts need the same target_modules")
    residuals = {}
    for layer, gradient in gradients.items():
        if gradient.ndim != 2 or not torch.isfinite(gradient).all():
            raise ValueError(f"CRAM capability_gap: layer {layer!r}: the gradient must be a finite (out, in) matrix")
        gradient = gradient.to(torch.float64)
        if layer not in bases:
            residuals[layer] = gradient
            continue
        _check_basis(layer, bases[layer], gradient.shape[1])
        basis = bases[layer].to(torch.float64)  # (in, k)
        residuals[layer] = gradient - (gradient @ basis) @ basis.T  # (out, in)
    return residuals


def _energy_rank(residual: Tensor, energy: float) -> int:
    """min r with Σ_{j≤r} σ_j² ≥ energy · Σ σ_j² (0 for a zero residual)."""
    squared = torch.linalg.svdvals(residual) ** 2  # descending
    total = squared.sum()
    if total == 0:
        return 0
    return int((squared.cumsum(0) < energy * total * (1 - 1e-12)).sum()) + 1


def allocate_rank(
    gradients: Mapping[str, Tensor], residuals: Mapping[str, Tensor], cfg: CramConfig
) -> RankAllocation:
    """rank = clip(⌈ρ · r_gap⌉, r_min, r_max) from the layers' gradients G and capability gaps R (module docstring)."""
    if not gradients:
        raise ValueError("CRAM allocate_rank: no layers (the gradients dict is empty)")
    if set(gradients) != set(residuals):
        raise ValueError(f"CRAM allocate_rank: gradient and residual layers differ "
                         f"({sorted(set(gradients) ^ set(residuals))[:3]})")
    total = sum(float(g.to(torch.float64).square().sum()) for g in gradients.values())
    gaps = {layer: float(r.to(torch.float64).square().sum()) for layer, r in residuals.items()}
    gap = sum(gaps.values())
    if gap > total * (1 + 1e-9):
        raise ValueError("CRAM allocate_rank: residuals carry more energy than the gradients; "
                         "pass R = capability_gap(G, Q) of the same G")
    if gap <= GAP_TOLERANCE * total:  # spanned up to the round-off of the projection: no gap
        return RankAllocation(rank=cfg.r_min, gap_ratio=gap / total if total else 0.0, energy_rank=0.0)
    energy_rank = sum(gaps[layer] / gap * _energy_rank(r.to(torch.float64), cfg.energy)
                      for layer, r in residuals.items())
    ratio = gap / total
    rank = min(cfg.r_max, max(cfg.r_min, math.ceil(ratio * energy_rank - 1e-9)))
    return RankAllocation(rank=rank, gap_ratio=ratio, energy_rank=energy_rank)


def estimate_gradients(
    base_model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    cfg: CramConfig,
) -> dict[str, Tensor]:
    """G = ∂L/∂W0 (out, in) float32 on CPU per targeted layer, the mean over `cfg.gradient_batches` mini-batches.

    The answer-token loss of `many.training`, at the base (no LoRA, the base projector), batches drawn as the
    trainer draws them (seed finetune.seed). Cost: gradient_batches forward+backward passes of the base, plus one
    float32 (out, in) accumulator per targeted layer — for LLaVA-1.5-7B's q,k,v,o,gate,up,down about 6.5·10⁹
    values (26 GB), so run it on the fine-tuning device. Only the targeted weights get gradients; their
    `requires_grad` flags and the model's training mode are restored afterwards, its values never change.
    """
    data = encode_dataset(processor, samples, max_positions(base_model))
    layers = targeted_linears(base_model, cfg.finetune.lora.target_modules)
    weights = [module.weight for module in layers.values()]
    flags = [weight.requires_grad for weight in weights]
    device, dtype = model_device_dtype(base_model)
    half = dtype in (torch.bfloat16, torch.float16)
    sums = [torch.zeros(weight.shape, dtype=torch.float32, device=device) for weight in weights]  # (out, in) each
    indices = batch_indices(len(data), cfg.finetune.batch_size, cfg.finetune.seed)
    was_training = base_model.training
    base_model.eval()
    try:
        for weight in weights:
            weight.requires_grad_(True)
        for _ in range(cfg.gradient_batches):
            batch = data.batch(next(indices), device)
            with torch.autocast(device.type, dtype=dtype, enabled=half):
                loss = base_model(**batch, use_cache=False).loss
            for total, gradient in zip(sums, torch.autograd.grad(loss, weights), strict=True):
                total.add_(gradient.float())
    finally:
        for weight, flag in zip(weights, flags, strict=True):
            weight.requires_grad_(flag)
        base_model.train(was_training)
    return {name: (total / cfg.gradient_batches).cpu() for name, total in zip(layers, sums, strict=True)}
