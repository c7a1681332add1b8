"""CRAM's orthogonality penalty: keep a new expert's updates out of the directions the old experts own.

With Q_l (in, k) an orthonormal basis of the old experts' A row spaces on layer l (`rank.expert_bases`) and
A_l (r, in) the new expert's LoRA A, the penalty added to every training micro-batch loss is

    P = λ Σ_l ‖A_l Q_l‖_F²

zero iff every row of every A_l is orthogonal to the old experts' input subspace. Since ΔW_l = s B_l A_l, the new
update then acts only on inputs the old experts do not read — CRAM's "confines new updates to task-specific
directions, preventing re-learning general capability" (in the spirit of O-LoRA's ‖A_old A_newᵀ‖ penalty).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftModel
from torch import Tensor

from many.stats import lora_layers


def lora_A(model: PeftModel) -> dict[str, Tensor]:
    """The active adapter's A (r, in) of every LoRA layer, by PEFT module name (live parameters, not copies)."""
    adapter = model.active_adapter
    return {name: module.lora_A[adapter].weight for name, module in lora_layers(model).items()}


def orthogonality_penalty(new_A: Mapping[str, Tensor], old_bases: Mapping[str, Tensor], weight: float) -> Tensor:
    """λ Σ_l ‖A_l Q_l‖_F² (a float32 scalar on A's device), computed in float32 even under autocast."""
    if set(new_A) != set(old_bases):
        raise ValueError(f"CRAM orthogonality_penalty: new-expert and old-basis layers differ "
                         f"({sorted(set(new_A) ^ set(old_bases))[:3]}); experts need the same target_modules")
    if not new_A:
        raise ValueError("CRAM orthogonality_penalty: no layers (new_A is empty)")
    total: Tensor | None = None
    for layer, A in new_A.items():
        basis = old_bases[layer]
        if A.ndim != 2 or basis.ndim != 2 or A.shape[1] != basis.shape[0]:
            raise ValueError(f"CRAM orthogonality_penalty: layer {layer!r}: A {tuple(A.shape)} and basis "
                             f"{tuple(basis.shape)} do not chain; expected A (r, in) and Q (in, k)")
        with torch.autocast(A.device.type, enabled=False):
            overlap = A.float() @ basis.to(A.device, torch.float32)  # (r, k)
            term = overlap.square().sum()
        total = term if total is None else total + term
    return weight * total
