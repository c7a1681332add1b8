"""Fwd-Prompt (Zheng et al., "Beyond Anti-Forgetting: Multimodal Continual Instruction Tuning with Positive Forward
Transfer", arXiv 2401.09181), a comparison system of docs/design.md §1: n soft prompts on the frozen LLaVA, trained task
after task, each gradient projected onto the residual of the earlier tasks' input-embedding core subspace and onto
the pre-trained token-embedding subspace. No old samples are kept — only the prompts and the core basis.

    subspace  energy bases, the GPM core update, g ← g Q Qᵀ with span(Q) = span(P) ∩ span(U)^⊥
    prompts   prompt tokens in the tokenizer, the prompted input embedding, prompted samples
    state     FwdPromptConfig, FwdPromptState (prompts, core), safetensors I/O
    train     train_task (one link of the chain), prompted_model (for many.evaluate)
"""

from many.methods.fwd_prompt.prompts import prompted_samples
from many.methods.fwd_prompt.state import FwdPromptConfig, FwdPromptState, load_state, save_state, trainable_parameters
from many.methods.fwd_prompt.subspace import project_gradient
from many.methods.fwd_prompt.train import prompted_model, train_task

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
