"""Gram statistics of LoRA-targeted layers for LPM (DESIGN.md §1 "LPM", §2 stats[t], §8 lesson 2).

For every LoRA-wrapped linear layer the same input X feeds the frozen W0 and the LoRA, so the layer's
least-squares merge needs only

    G_i = X_iᵀ X_i / N_i        (in × in),   X_i: N_i × in

over task i's training tokens. DESIGN.md §8 measured that G must come from task i's OWN fine-tuned model
(its LoRA and its projector) and cover ALL non-padding tokens of each sequence — image, prompt and answer;
Grams of the base model, or of answer tokens only, ruin the merge.

The sum XᵀX is accumulated in float64 batch by batch with forward pre-hooks (activations are never held),
then divided by N. Layers fed by the same tensor (q/k/v after one norm, gate/up after another) receive
the product computed once for the first of them. Grams are stored float32 (DESIGN.md §2) and read back
as float64, keyed by PEFT module name (the adapter's keys minus ".lora_A.weight").
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LlavaProcessor

from many.config import StatsConfig
from many.data.schema import Sample
from many.model.chat import encode_for_training


def lora_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    """Every LoRA-wrapped module by PEFT module name.

    E.g. "base_model.model.model.language_model.layers.0.self_attn.q_proj" = the adapter key minus ".lora_A.weight".
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if not layers:
        raise ValueError("collect_grams: the model has no LoRA layers; pass the task's fine-tuned PeftModel")
    return layers


def collect_grams(
    model: PeftModel,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    cfg: StatsConfig,
    *,
    progress: bool = True,
) -> dict[str, Tensor]:
    """G = XᵀX / N (in, in) float64 for every LoRA layer, over all non-padding tokens of `samples`.

    `model` is the task's own fine-tuned model; it is run in eval mode without gradients and restored
    to its previous training mode afterwards. The first `cfg.max_samples` samples are used (all if None).
    """
    samples = tuple(samples)[: cfg.max_samples]
    if not samples:
        raise ValueError("collect_grams: no samples; the task's training split is empty")
    layers = lora_layers(model)
    device = next(model.parameters()).device
    tower_dtype = next(model.get_base_model().model.vision_tower.parameters()).dtype
    sums: dict[str, Tensor] = {}  # name -> Σ XᵀX (in, in) float64
    mask: list[Tensor] = []  # the current batch's attention mask (B, L), read by the hooks
    last: list[tuple[weakref.ref, Tensor]] = []  # (input seen last, its XᵀX): shared inputs are multiplied once

    def hook_for(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]  # (B, L, in)
            if last and last[0][0]() is x:
                product = last[0][1]
            else:
                if x.shape[:2] != mask[0].shape:
                    raise ValueError(
                        f"collect_grams: layer {name} sees inputs of shape {tuple(x.shape)} but the batch mask is "
                        f"{tuple(mask[0].shape)}; the model must keep one position per input token"
                    )
                tokens = x[mask[0].bool()].to(torch.float64)  # (n, in): padding excluded
                product = tokens.T @ tokens  # (in, in)
                last[:] = [(weakref.ref(x), product)]
            if name in sums:
                sums[name].add_(product)
            else:
                sums[name] = product.clone()

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    tokens_seen = 0
    try:
        with torch.no_grad():
            starts = range(0, len(samples), cfg.batch_size)
            for start in tqdm(starts, desc="grams", disable=not progress):
                batch = encode_for_training(processor, samples[start : start + cfg.batch_size])
                batch.pop("labels")
                batch = {k: v.to(device) for k, v in batch.items()}
                batch["pixel_values"] = batch["pixel_values"].to(tower_dtype)
                mask[:] = [batch["attention_mask"]]
                last.clear()
                model(**batch, use_cache=False)
                tokens_seen += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = sorted(set(layers) - set(sums))
    if missing:
        raise ValueError(f"collect_grams: LoRA layers never ran in the forward pass: {missing[:3]} …")
    return {name: (total / tokens_seen).cpu() for name, total in sums.items()}


def save_grams(grams: dict[str, Tensor], path: str | Path) -> Path:
    """Write Grams as float32 safetensors (DESIGN.md §2), keys = PEFT module names."""
    bad = [name for name, gram in grams.items() if gram.ndim != 2 or gram.shape[0] != gram.shape[1]]
    if bad:
        raise ValueError(f"save_grams: Grams must be square (in, in); not so for {bad[:3]}")
    path = Path(path)
    save_file({name: gram.to(torch.float32).contiguous() for name, gram in grams.items()}, str(path))
    return path


def load_grams(path: str | Path) -> dict[str, Tensor]:
    """Grams as float64 (the merge computes in float64), keys = PEFT module names."""
    return {name: gram.to(torch.float64) for name, gram in load_file(str(path)).items()}
