"""Fwd-Prompt (Zheng et al., "Beyond Anti-Forgetting: Multimodal Continual Instruction Tuning with Positive Forward
Transfer", arXiv 2401.09181), a comparison system of docs/design.md §1: n soft prompts on the frozen LLaVA, trained task
after task, each gradient projected onto the residual of the earlier tasks' input-embedding core subspace and onto
the pre-trained token-embedding subspace. No old samples are kept — only the prompts and the core basis.

    subspace  energy bases, the GPM core update, g ← g Q Qᵀ with span(Q) = span(P) ∩ span(U)^⊥
    prompts   prompt tokens in the tokenizer, the prompted input embedding, prompted samples
    config    FwdPromptConfig (torch-free: the run config validates without torch)
    state     FwdPromptState (prompts, core), safetensors I/O
    train     train_task (one link of the chain), prompted_model (for many.evaluate)

The package is lazy (PEP 562): `FwdPromptConfig` loads without torch; every other name loads its module on first
use.
"""

from __future__ import annotations

from many.lazy import lazy_attributes
from many.methods.fwd_prompt.config import FwdPromptConfig

_LAZY = {
    "FwdPromptState": "state",
    "load_state": "state",
    "save_state": "state",
    "trainable_parameters": "state",
    "project_gradient": "subspace",
    "prompted_samples": "prompts",
    "prompted_model": "train",
    "train_task": "train",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "FwdPromptConfig",
    "FwdPromptState",
    "load_state",
    "project_gradient",
    "prompted_model",
    "prompted_samples",
    "save_state",
    "trainable_parameters",
    "train_task",
]
