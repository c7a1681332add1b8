"""Gram statistics of LoRA-targeted layers for LPM (docs/design.md §1 "LPM", §2 stats[t], §8 lesson 2).

For every LoRA-wrapped linear layer the same input X feeds the frozen W0 and the LoRA, so the layer's
least-squares merge needs only

    G_i = X_iᵀ X_i / N_i        (in × in),   X_i: N_i × in

over task i's training tokens. docs/design.md §8 measured that G must come from task i's OWN fine-tuned model
(its LoRA and its projector) and cover ALL non-padding tokens of each sequence — image, prompt and answer;
Grams of the base model, or of answer tokens only, ruin the merge. The same pass also takes G_answer,i, the Gram of
the positions that predict an answer token, which LPM adds to G_i with a weight (LPMConfig.answer; docs/design.md §1).

The sum XᵀX is accumulated in float64 batch by batch with forward pre-hooks (activations are never held),
then divided by N. Layers fed by the same tensor (q/k/v after one norm, gate/up after another) form an input
group: the product is computed and summed once, for the group's first layer, and every layer of the group gets
that same Gram tensor object. Grams are stored float32 (or bfloat16 / float16: StatsConfig.gram_dtype; docs/design.md
§2), ONCE per input group, and read back as float64, keyed by PEFT module name (the adapter's keys minus ".lora_A.weight"):

    safetensors tensors   {group key: G (in, in) float32}, group key = the name of the group's first layer
    safetensors metadata  {"grams": JSON {"format": GRAMS_FORMAT, "groups": {layer: group key}}}

At LLaVA-1.5-7B shapes this is 3 Grams of 4096² and one of 11008² per decoder block instead of 6 + 1.
A file without the metadata (the earlier format) is read as one group per layer.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlavaProcessor

from many.config import StatsConfig
from many.data.schema import Sample
from many.loop import answer_positions
from many.model.chat import encode_for_training
from many.model.parts import llava
from many.progress import BatchCallback

GRAMS_FORMAT = "many.grams/2"  # safetensors metadata "format" of a Grams file stored once per input group


def lora_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    """Every LoRA-wrapped module by PEFT module name.

    E.g. "base_model.model.model.language_model.layers.0.self_attn.q_proj" = the adapter key minus ".lora_A.weight".
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if not layers:
        raise ValueError("collect_grams: the model has no LoRA layers; pass the task's fine-tuned PeftModel")
    return layers


def encoded_batches(model: nn.Module, processor: LlavaProcessor, samples: Sequence[Sample],
                    batch_size: int) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """`samples` encoded as for training, `batch_size` at a time: (the model's inputs on its device, the pixels in its
    vision tower's dtype; the labels (B, L), on the CPU). For a LLaVA or a PeftModel around one."""
    device = next(model.parameters()).device
    tower_dtype = next(llava(model).model.vision_tower.parameters()).dtype
    for start in range(0, len(samples), batch_size):
        batch = encode_for_training(processor, samples[start : start + batch_size])
        labels = batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(tower_dtype)
        yield batch, labels


class TaskGrams(NamedTuple):
    """A task's two Grams per LoRA layer (in, in) float64, from one forward pass: over all non-padding tokens, and over
    the positions that predict an answer token (LPM's G_all and G_answer; docs/design.md §1)."""

    all: dict[str, Tensor]
    answer: dict[str, Tensor]


def collect_grams(
    model: PeftModel,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    cfg: StatsConfig,
    *,
    progress: bool = True,
    on_batch: BatchCallback | None = None,
) -> TaskGrams:
    """G = XᵀX / N for every LoRA layer in one pass over `samples`, twice: over all non-padding tokens (`all`, what
    every Gram-based merge reads) and over the positions that predict an answer token only (`answer`:
    many.loop.answer_positions, the positions the training loss reads; LPM's answer weighting, LPMConfig.answer).

    Layers that read the same input tensor share one Gram: each returned dict maps them to the same tensor object
    (what `save_grams` stores once). `model` is the task's own fine-tuned model; it is run in eval mode without
    gradients and restored to its previous training mode afterwards. The first `cfg.max_samples` samples are used
    (all if None). `on_batch(batches done, batches)` after each batch.
    """
    samples = tuple(samples)[: cfg.max_samples]
    if not samples:
        raise ValueError("collect_grams: no samples; the task's training split is empty")
    layers = lora_layers(model)
    sums: dict[str, dict[str, Tensor]] = {"all": {}, "answer": {}}  # kind → group's first layer → Σ XᵀX (in, in) f64
    group_of: dict[str, str] = {}  # layer -> its group's first layer (itself for the first)
    masks: dict[str, Tensor] = {}  # the current batch's positions of each kind (B, L), read by the hooks
    last: list[tuple[weakref.ref, str]] = []  # (input seen last, the layer that summed its XᵀX)

    def hook_for(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]  # (B, L, in)
            owner = last[0][1] if last and last[0][0]() is x and last[0][1] != name else name
            if group_of.setdefault(name, owner) != owner:
                raise ValueError(
                    f"collect_grams: layer {name} shares its input with {owner} in one batch but not in another; "
                    "the model's layers must read the same inputs in every forward pass"
                )
            if owner != name:
                return  # the owner already summed this input's XᵀX
            if x.shape[:2] != masks["all"].shape:
                raise ValueError(
                    f"collect_grams: layer {name} sees inputs of shape {tuple(x.shape)} but the batch mask is "
                    f"{tuple(masks['all'].shape)}; the model must keep one position per input token"
                )
            last[:] = [(weakref.ref(x), name)]
            for kind, mask in masks.items():
                tokens = x[mask.bool()].to(torch.float64)  # (n, in): the kind's positions, padding excluded
                product = tokens.T @ tokens  # (in, in)
                if name in sums[kind]:
                    sums[kind][name].add_(product)
                else:
                    sums[kind][name] = product

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    seen = {"all": 0, "answer": 0}  # tokens summed, per kind
    try:
        with torch.no_grad():
            total = math.ceil(len(samples) / cfg.batch_size)
            batches = tqdm(encoded_batches(model, processor, samples, cfg.batch_size), total=total, desc="grams",
                           disable=not progress)
            for done, (batch, labels) in enumerate(batches, 1):
                masks["all"] = batch["attention_mask"]  # (B, L), on the model's device
                masks["answer"] = answer_positions(labels).to(masks["all"].device)  # (B, L)
                last.clear()
                model(**batch, use_cache=False)
                for kind, mask in masks.items():
                    seen[kind] += int(mask.sum())
                if on_batch is not None:
                    on_batch(done, total)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen["answer"]:
        raise ValueError("collect_grams: no answer tokens in the task's training samples")
    missing = sorted(set(layers) - set(group_of))
    if missing:
        raise ValueError(f"collect_grams: LoRA layers never ran in the forward pass: {missing[:3]} …")

    def per_layer(kind: str) -> dict[str, Tensor]:
        grams = {owner: (total / seen[kind]).cpu() for owner, total in sums[kind].items()}
        return {name: grams[group_of[name]] for name in layers}

    return TaskGrams(per_layer("all"), per_layer("answer"))


def gram_groups(grams: Mapping[str, Tensor]) -> dict[str, str]:
    """{layer: group key}: layers given the same tensor object share a group, keyed by its first layer's name."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(gram), name) for name, gram in grams.items()}


def save_grams(grams: Mapping[str, Tensor], path: str | Path, dtype: str = "float32") -> Path:
    """Write Grams as safetensors in `dtype` (StatsConfig.gram_dtype: float32, bfloat16 or float16; docs/design.md
    §2), one tensor per input group (layers mapped to the same tensor object, as `collect_grams` returns them), with
    the layer → group map in the metadata. A Gram that does not fit `dtype` (float16 past 65504) is a ValueError."""
    bad = [name for name, gram in grams.items() if gram.ndim != 2 or gram.shape[0] != gram.shape[1]]
    if bad:
        raise ValueError(f"save_grams: Grams must be square (in, in); not so for {bad[:3]}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"save_grams: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    groups = gram_groups(grams)
    tensors = {key: grams[key].to(getattr(torch, dtype)).contiguous() for key in dict.fromkeys(groups.values())}
    overflow = [key for key, gram in tensors.items() if not torch.isfinite(gram).all()]
    if overflow:
        raise ValueError(f"save_grams: the Grams of {overflow[:3]} do not fit {dtype} (NaN, Inf or past its range); "
                         "use stats.gram_dtype bfloat16 or float32")
    path = Path(path)
    # One metadata key: safetensors writes several in a random order, and stored bytes must not vary between runs.
    save_file(tensors, str(path), metadata={"grams": json.dumps({"format": GRAMS_FORMAT, "groups": groups})})
    return path


def read_gram_groups(path: str | Path) -> dict[str, str]:
    """{layer: group key} of a Grams file, from its metadata alone (no Gram is read). The group key names the
    file's tensor; a file of the earlier format (no metadata) holds one group per layer."""
    with safe_open(str(path), framework="pt") as f:
        metadata, keys = f.metadata() or {}, list(f.keys())
    if "grams" not in metadata:
        return {key: key for key in keys}
    stored = json.loads(metadata["grams"])
    if not isinstance(stored, dict) or stored.get("format") != GRAMS_FORMAT:
        raise ValueError(f"{path}: Grams metadata {metadata['grams'][:80]!r} is not of format {GRAMS_FORMAT!r}; recompute the stats")
    groups = stored.get("groups")
    if not isinstance(groups, dict):
        raise ValueError(f"{path}: the Grams metadata 'groups' must map layers to group keys; recompute the stats")
    unknown = sorted(set(groups.values()) - set(keys))
    if unknown:
        raise ValueError(f"{path}: the Grams metadata names groups the file does not hold: {unknown[:3]}; recompute the stats")
    return groups


def load_grams(path: str | Path) -> dict[str, Tensor]:
    """Grams as float64 (the merge computes in float64), keys = PEFT module names; the layers of one input group
    map to the same tensor object."""
    groups = read_gram_groups(path)
    stored = {key: gram.to(torch.float64) for key, gram in load_file(str(path)).items()}
    return {name: stored[key] for name, key in groups.items()}
