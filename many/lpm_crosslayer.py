"""Cross-layer Grams (issue #16, lever 4d; RegMean++-style; docs/design.md §1.4): MAny's least-squares merge with
each layer's Grams taken through the merged earlier layers. Experimental: the `many_xl` row.

LPM fits each layer's merged update M on G_i = X_iᵀX_i / N_i, X_i the layer's inputs over task i's training tokens
under task i's OWN model (many.stats). The merged model feeds that layer other inputs: every earlier layer carries
M, not ΔW_i. Merging the input groups (layers that read one tensor) in forward order g = 1 … n instead,

    X_i^g = group g's inputs over task i's tokens under W0 + M on the groups < g, with task i's own projector
    G_i^g = X_i^gᵀ X_i^g / N_i                                                              (in, in)
    M_gᵀ  = (Σ_i G̃_i^g + γ·mean diag(Σ_i G̃_i^g)·I)⁻¹ Σ_i G̃_i^g ΔW_iᵀ                      (in, out)

(RegMean's solve, many.merging.regmean, with LPM's a and γ) fits each layer on the inputs the merged model will
give it. The first group sees no merged layer, so its Grams are the stats stage's.

What it costs the incremental design: G_i^g depends on M_{<g} of step t, so no Gram carries over from one step to
the next. Step t re-reads the training samples of every task ≤ t once per input group (a forward pass cut at the
group: about n/2 full passes per task), O(t·n) where MAny's RLS step is O(1) in t, and it needs every earlier
task's data and adapter at every step, not only their running sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from many.config import LPMConfig, StatsConfig
from many.data.schema import Sample
from many.merging import regmean
from many.merging.config import RegMeanConfig
from many.model.parts import PEFT_PREFIX
from many.progress import BatchCallback
from many.stats import encoded_batches


@dataclass(frozen=True)
class TaskParts:
    """One task's part in the merge: its update per PEFT module name, its own projector, its training samples."""

    deltas: Mapping[str, Tensor]  # PEFT module name -> ΔW_i (out, in)
    projector: Mapping[str, Tensor]  # state dict of multi_modal_projector
    samples: Sequence[Sample]


class _Cut(Exception):
    """Raised by the hook of the group being measured: nothing after it needs to run."""


def input_groups(model: nn.Module, batch: Mapping[str, Tensor], names: Sequence[str]) -> list[tuple[str, ...]]:
    """The modules `names` (plain module names) as input groups in forward order: consecutive calls on the same
    input tensor form one group (q/k/v after one norm, gate/up after another). ValueError if one is not in the model
    or never runs."""
    modules = dict(model.named_modules())
    unknown = sorted(set(names) - set(modules))
    if unknown:
        raise ValueError(f"cross-layer merge: the adapters name layers the base model does not have: {unknown[:3]}; "
                         "were they trained on another base?")
    calls: list[tuple[Tensor, str]] = []  # (input, module), in call order; held for this one batch

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            calls.append((args[0], name))
        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for i, (x, name) in enumerate(calls):
        if any(name in group for group in groups):
            continue  # a module called twice in one pass keeps its first place
        if i and calls[i - 1][0] is x and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = sorted(set(names) - {name for group in groups for name in group})
    if missing:
        raise ValueError(f"cross-layer merge: LoRA layers never ran in the forward pass: {missing[:3]} …")
    return [tuple(group) for group in groups]


def group_gram(model: nn.Module, processor: LlavaProcessor, samples: Sequence[Sample], module: nn.Module,
               cfg: StatsConfig) -> Tensor:
    """G = XᵀX / N (in, in) float64 of `module`'s inputs over the non-padding tokens of `samples`, each forward pass
    cut right after `module`'s input is read."""
    total: list[Tensor] = []
    mask: list[Tensor] = []
    seen = 0

    def hook(_module: nn.Module, args: tuple) -> None:
        tokens = args[0][mask[0].bool()].to(torch.float64)  # (n, in): padding excluded
        product = tokens.T @ tokens  # (in, in)
        total[:] = [total[0] + product] if total else [product]
        raise _Cut

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch, _ in encoded_batches(model, processor, tuple(samples)[: cfg.max_samples], cfg.batch_size):
                mask[:] = [batch["attention_mask"]]
                seen += int(batch["attention_mask"].sum())
                try:
                    model(**batch, use_cache=False)
                except _Cut:
                    pass
    finally:
        handle.remove()
    if not total:
        raise ValueError("cross-layer merge: a task has no training samples")
    return (total[0] / seen).cpu()


def cross_layer_merge(
    base_model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    tasks: Sequence[TaskParts],
    lpm: LPMConfig,
    stats: StatsConfig,
    *,
    on_group: BatchCallback | None = None,
) -> dict[str, Tensor]:
    """M per PEFT module name (out, in) by the module doc's recursion over input groups; `base_model` is left as it
    is (the merge works on a copy). `on_group(groups done, groups)` after each group."""
    from many.evaluate import Assembly, assemble

    if not tasks:
        raise ValueError("cross-layer merge: no task to merge")
    peft_names = list(tasks[0].deltas)
    if any(set(task.deltas) != set(peft_names) for task in tasks):
        raise ValueError("cross-layer merge: the tasks' adapters target different layers; fine-tune them with one "
                         "finetune.lora.target_modules")
    model = assemble(base_model, Assembly())  # a copy: W0 + M is folded into it group by group
    modules = dict(model.named_modules())
    solve = RegMeanConfig(a=lpm.a, gamma=lpm.gamma)
    projector = model.model.multi_modal_projector
    projector.load_state_dict(tasks[0].projector)
    probe, _ = next(encoded_batches(model, processor, tasks[0].samples[:1], stats.batch_size))
    groups = input_groups(model, probe, [name.removeprefix(PEFT_PREFIX) for name in peft_names])
    merged: dict[str, Tensor] = {}
    for done, group in enumerate(groups, 1):
        grams = []
        for task in tasks:
            projector.load_state_dict(task.projector)
            grams.append(group_gram(model, processor, task.samples, modules[group[0]], stats))
        solved = {PEFT_PREFIX + name: regmean.merge([task.deltas[PEFT_PREFIX + name] for task in tasks], grams, solve)
                  for name in group}
        assemble(model, Assembly(solved), copy_base=False)  # W0 + M_g: what the later groups' inputs pass through
        merged |= solved
        if on_group is not None:
            on_group(done, len(groups))
    return {name: merged[name] for name in peft_names}
