"""Fwd-Prompt's explicit state between tasks: the prompts and the core basis (docs/design.md §1).

No old samples are stored — only the n soft prompts (n, d) and the orthonormal core basis U (d, k) of the earlier
tasks' input embeddings (many.methods.fwd_prompt.subspace). The state of task t is a pure function of the state of
task t−1, the base and task t's data, written as one safetensors file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from many.methods.fwd_prompt.config import FwdPromptConfig
from many.methods.fwd_prompt.subspace import check_basis

STATE_FILE = "fwd_prompt.safetensors"


def trainable_parameters(cfg: FwdPromptConfig, d: int) -> int:
    """n_prompts · d: the prompts are the only trained tensor (the core is computed, not trained)."""
    return cfg.n_prompts * d


@dataclass(frozen=True, eq=False)  # eq=False: a field-wise == on tensors has no truth value
class FwdPromptState:
    """After `tasks` tasks: the prompts (n, d) float32 and the core basis U (d, k) float64, orthonormal columns."""

    prompts: Tensor  # (n, d) float32
    core: Tensor  # (d, k) float64
    tasks: int

    def __post_init__(self) -> None:
        if self.prompts.ndim != 2 or self.prompts.shape[0] < 1:
            raise ValueError(f"FwdPromptState: prompts must be (n ≥ 1, d), got {tuple(self.prompts.shape)}")
        if self.prompts.dtype != torch.float32 or not torch.isfinite(self.prompts).all():
            raise ValueError(f"FwdPromptState: prompts must be finite float32, got {self.prompts.dtype}")
        check_basis(self.core, self.prompts.shape[1], "FwdPromptState core")
        if self.tasks < 1:
            raise ValueError(f"FwdPromptState: tasks must be ≥ 1 (a state exists after a task), got {self.tasks}")


def save_state(state: FwdPromptState, out_dir: Path) -> Path:
    """Write `out_dir/fwd_prompt.safetensors` ("prompts", "core"; metadata "tasks"); returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"prompts": state.prompts.detach().cpu().contiguous(), "core": state.core.detach().cpu().contiguous()}
    save_file(tensors, str(out_dir / STATE_FILE), metadata={"tasks": str(state.tasks)})
    return out_dir


def load_state(task_dir: Path) -> FwdPromptState:
    """The state written by `save_state` into `task_dir`."""
    path = Path(task_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no Fwd-Prompt state at {path}; is {task_dir} a directory written by save_state?")
    with safe_open(str(path), framework="pt") as reader:
        keys, metadata = set(reader.keys()), reader.metadata() or {}
        if keys != {"prompts", "core"} or "tasks" not in metadata:
            raise ValueError(f"{path}: expected tensors ['core', 'prompts'] and metadata 'tasks', "
                             f"got {sorted(keys)} and {sorted(metadata)}")
        return FwdPromptState(reader.get_tensor("prompts"), reader.get_tensor("core"), int(metadata["tasks"]))
