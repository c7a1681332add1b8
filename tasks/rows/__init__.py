"""The registry of method rows (docs/design.md §10): every method of the comparison table, one module each.

    ROWS: name → Row          the built-in rows below, in table order, then those named by $MANY_ROWS

A row module defines `ROW` (tasks.rows.row.Row): what it reads per task, its chain stage if it has one, and how
its eval builds and scores its model. Adding a method = one module in tasks/rows/ + one line in BUILT_IN (+ a
field of MethodSettings if it has settings of its own) + one test file. A row kept outside this package is loaded
by naming its module in $MANY_ROWS (comma-separated); set it wherever stages run (a remote Ray cluster too), since
eval and chain stages look their row up by name in the worker.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from pydantic import model_validator

from many.config import FinetuneConfig, Frozen, ResidualConfig
from many.merging.config import AverageConfig, RegMeanConfig, TaskArithmeticConfig, TiesConfig
from many.methods.cram import CramConfig
from many.methods.fwd_prompt import FwdPromptConfig
from tasks.rows.row import Chain, Row

BUILT_IN = (
    "tasks.rows.many",
    "tasks.rows.many_lpm_only",
    "tasks.rows.many_cpm_only",
    "tasks.rows.many_r",
    "tasks.rows.many_r_cos",
    "tasks.rows.many_all",
    "tasks.rows.many_cos",
    "tasks.rows.many_xl",
    "tasks.rows.individual",
    "tasks.rows.seqlora",
    "tasks.rows.average",
    "tasks.rows.task_arithmetic",
    "tasks.rows.ties",
    "tasks.rows.regmean",
    "tasks.rows.cram",
    "tasks.rows.cram_lda",
    "tasks.rows.fwd_prompt",
)
PLUGINS = "MANY_ROWS"


def _load(modules: tuple[str, ...]) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for module in modules:
        try:
            row = importlib.import_module(module).ROW
        except ImportError as error:
            raise ImportError(f"method row module {module!r} (${PLUGINS} or BUILT_IN) cannot be imported: {error}") from error
        except AttributeError:
            raise ImportError(f"method row module {module!r} defines no ROW") from None
        if not isinstance(row, Row):
            raise TypeError(f"{module}.ROW is a {type(row).__name__}, not a tasks.rows.row.Row")
        if row.name in rows:
            raise ValueError(f"method row {row.name!r} is declared twice (again in {module})")
        rows[row.name] = row
    return rows


ROWS: dict[str, Row] = _load(BUILT_IN + tuple(m.strip() for m in os.environ.get(PLUGINS, "").split(",") if m.strip()))
DEFAULT_METHODS: tuple[str, ...] = tuple(name for name, row in ROWS.items() if row.default)


def get_row(name: str) -> Row:
    """The row called `name`; ValueError listing the known ones otherwise."""
    if name not in ROWS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(ROWS)}")
    return ROWS[name]


def chains() -> dict[str, Chain]:
    """Every row's chains by stage name, extras and followed chains included (a chain several rows read appears
    once); ValueError if two different chains take one stage name."""
    found: dict[str, Chain] = {}
    for row in ROWS.values():
        for chain in row.chains():
            if found.setdefault(chain.stage, chain) is not chain:
                raise ValueError(f"two chains are named {chain.stage!r} (again in method row {row.name!r}); "
                                 "a chain's stage name must be its own")
    return found


class MergingConfig(Frozen):
    """Hyper-parameters of the batch merge baselines (many.merging)."""

    average: AverageConfig = AverageConfig()
    task_arithmetic: TaskArithmeticConfig = TaskArithmeticConfig()
    ties: TiesConfig = TiesConfig()
    regmean: RegMeanConfig = RegMeanConfig()


class MethodSettings(Frozen):
    """The run config's sections that belong to method rows (YAML top level: merging, many_r, cram, fwd_prompt).

    CRAM and Fwd-Prompt train with the run's budget: `cram.finetune` defaults to the `finetune` section, and
    `fwd_prompt` to its steps, batch_size and seed, unless their section sets its own.
    """

    merging: MergingConfig = MergingConfig()
    many_r: ResidualConfig = ResidualConfig()
    cram: CramConfig = CramConfig()
    fwd_prompt: FwdPromptConfig = FwdPromptConfig()

    @model_validator(mode="before")
    @classmethod
    def _same_training_budget(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "finetune" not in data:
            return data
        finetune = data["finetune"]
        given = finetune.model_dump(exclude_unset=True) if isinstance(finetune, FinetuneConfig) else finetune
        if not isinstance(given, dict):
            return data  # not a mapping: the finetune field's own validation names the problem
        data = dict(data)
        cram, fwd_prompt = data.get("cram", {}), data.get("fwd_prompt", {})
        if isinstance(cram, dict) and "finetune" not in cram:
            data["cram"] = {**cram, "finetune": finetune}
        if isinstance(fwd_prompt, dict):
            inherited = {k: given[k] for k in ("steps", "batch_size", "seed") if k in given}
            data["fwd_prompt"] = {**inherited, **fwd_prompt}
        return data


__all__ = ["BUILT_IN", "DEFAULT_METHODS", "MethodSettings", "ROWS", "chains", "get_row"]
