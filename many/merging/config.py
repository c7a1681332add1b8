"""The hyper-parameters of the merge baselines (many.merging), torch-free: the run config (flows/config.py,
tasks.rows.MethodSettings) validates them without importing the mergers."""

from __future__ import annotations

from pydantic import Field

from many.config import Frozen


class AverageConfig(Frozen):
    """Average merging has no hyper-parameter."""


class TaskArithmeticConfig(Frozen):
    scale: float = Field(0.3, gt=0)  # λ


class TiesConfig(Frozen):
    density: float = Field(0.2, gt=0, le=1)  # fraction of each task's entries kept by the trim
    scale: float = Field(1.0, gt=0)  # λ


class RegMeanConfig(Frozen):
    a: float = Field(0.9, ge=0, le=1)  # off-diagonal scale of each Gram
    gamma: float = Field(0.0, ge=0)  # ridge, relative to the mean diagonal of Σ G̃_i


__all__ = ["AverageConfig", "RegMeanConfig", "TaskArithmeticConfig", "TiesConfig"]
