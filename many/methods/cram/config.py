"""The configuration of the CRAM baseline (many.methods.cram; docs/design.md §1 "Comparison methods")."""

from __future__ import annotations

from pydantic import Field, PositiveInt, model_validator

from many.config import FinetuneConfig, Frozen


class CramConfig(Frozen):
    """One CRAM expert: its training, its adaptive rank and its orthogonality penalty.

    finetune:         the per-task trainer; `lora.rank` is replaced by the allocated rank and `lora.alpha` rescaled
                      so that s = alpha / rank keeps the configured value.
    r_min, r_max:     bounds of the allocated rank.
    energy:           share of the capability gap's squared singular values the rank must capture.
    ortho_weight:     λ of the penalty λ Σ_l ‖A_new,l Q_old,l‖_F².
    gradient_batches: mini-batches (of finetune.batch_size) over which the base gradient is averaged.
    """

    finetune: FinetuneConfig = FinetuneConfig()
    r_min: PositiveInt = 2
    r_max: PositiveInt = 16
    energy: float = Field(0.9, gt=0, le=1)
    ortho_weight: float = Field(1.0, ge=0)
    gradient_batches: PositiveInt = 4

    @model_validator(mode="after")
    def _rank_bounds(self) -> CramConfig:
        if self.r_min > self.r_max:
            raise ValueError(f"CramConfig: r_min ({self.r_min}) > r_max ({self.r_max}); set r_min ≤ r_max")
        return self
