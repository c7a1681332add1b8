"""Fwd-Prompt's configuration (many.methods.fwd_prompt; docs/design.md §1), torch-free: the run
config (tasks.rows.MethodSettings) validates it without importing torch."""

from __future__ import annotations

from pydantic import Field, PositiveInt

from many.config import Frozen


class FwdPromptConfig(Frozen):
    """Prompt tuning with gradient projection, one task at a time from the previous task's prompts.

    n_prompts:         soft prompt tokens in front of every user prompt (trainable parameters = n_prompts · d).
    steps, batch_size: optimizer steps and samples per step.
    lr, momentum:      SGD with momentum (not Adam: its per-coordinate scaling would rotate a projected gradient
                       out of the allowed subspace; momentum and the cosine lr keep it in — see train.py).
    energy_core:       share of a task's input-embedding energy its core directions must capture (GPM threshold).
    energy_pretrained: share of the base token-embedding matrix's energy the pre-trained subspace P must capture.
    project:           False trains the same prompts without projection (plain sequential prompt tuning).
    core_max_samples:  training samples whose input embeddings define the task's core (None: all).
    """

    n_prompts: PositiveInt = 8
    steps: PositiveInt = 600
    batch_size: PositiveInt = 16
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    energy_core: float = Field(0.95, gt=0, le=1)
    energy_pretrained: float = Field(0.99, gt=0, le=1)
    project: bool = True
    core_max_samples: PositiveInt | None = None
    seed: int = 0
