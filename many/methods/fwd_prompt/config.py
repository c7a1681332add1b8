"""Fwd-Prompt's configuration (many.methods.fwd_prompt; docs/design.md §1), torch-free: the run
config (tasks.rows.MethodSettings) validates it without importing torch."""

from __future__ import annotations

from pydantic import Field, PositiveInt

from many.config import Frozen


class FwdPromptConfig(Frozen):
    """Prompt tuning with gradient projection, one task at a time from the previous task's prompts.

    n_prompts:         soft prompt tokens in front of every user prompt (trainable parameters = n_prompts · d).
                       32, chosen by Fwd-Prompt's own training loss (benchmarks/fwd_prompt_sweep.py): with 8 the
                       prompts hardly move the tiny base (after 200 steps at any lr in 0.01–1 the answer-token loss
                       stays at 5–9 nats and no task beats the untrained base); with 32 it falls to 1–3 and
                       style-cls is learnt; 64 does not fit the tiny base's 128 positions (64 image tokens plus
                       chart-qa's 95-token prompt and answer would need 159).
    steps, batch_size: optimizer steps and samples per step.
    lr, momentum:      SGD with momentum (not Adam: its per-coordinate scaling would rotate a projected gradient
                       out of the allowed subspace; momentum and the cosine lr keep it in — see train.py).
    energy_core:       share of a task's input-embedding energy its core directions must capture (GPM threshold).
    energy_pretrained: share of the base token-embedding matrix's energy the pre-trained subspace P must capture.
    project:           False trains the same prompts without projection (plain sequential prompt tuning).
    core_max_samples:  training samples whose input embeddings define the task's core (None: all).
    """

    n_prompts: PositiveInt = 32
    steps: PositiveInt = 600
    batch_size: PositiveInt = 16
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    energy_core: float = Field(0.95, gt=0, le=1)
    energy_pretrained: float = Field(0.99, gt=0, le=1)
    project: bool = True
    core_max_samples: PositiveInt | None = None
    seed: int = 0
