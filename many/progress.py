"""Progress and the loss curve of long computations, as plain callbacks (docs/design.md §4 "Progress").

A training loop (`many.loop.run_steps`) reports every optimizer step as a `Step` to its `on_step` callback; answer
generation, Gram collection and feature extraction report `(done, total)` after each batch to an `on_batch`
callback. Nothing here knows where the reports go: the stage layer forwards them, throttled, from a Ray worker to
the driver's display and Prefect's run logs (tasks/progress.py), and `LossCurve` keeps every step as the `losses`
Parquet of a training stage:

    step int64 (1 … steps)   loss float64 (mean over the step's micro-batches)   lr float64   seconds float64

`lr` is the learning rate the step used (the optimizer's first parameter group: the LoRA factors when fine-tuning);
`seconds` the wall-clock time from the start of the first step to the end of this one. Loss and lr are bit-identical
for the same seed and data (docs/design.md §2.2); `seconds` is not, so no stage keys on a `losses` file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Step:
    """One optimizer step just done."""

    step: int  # steps done: 1 … total
    total: int  # steps the loop runs
    loss: float  # mean loss over the step's micro-batches (its extra loss included)
    lr: float  # learning rate of the step (the optimizer's first parameter group)
    seconds: float  # since the first step started


StepCallback = Callable[[Step], None]
BatchCallback = Callable[[int, int], None]  # (items done, items in this call), after each batch

LOSS_SCHEMA = pa.schema([("step", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()), ("seconds", pa.float64())])


def fan_out(*callbacks: Callable | None) -> Callable | None:
    """One callback calling each given one in order; None when none is given (so loops skip the work)."""
    present = [callback for callback in callbacks if callback is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def call(*args) -> None:
        for callback in present:
            callback(*args)

    return call


class LossCurve:
    """Records every `Step` it is called with (pass it as `on_step`) and writes them as the `losses` Parquet."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def __call__(self, step: Step) -> None:
        self.steps.append(step)

    def table(self) -> pa.Table:
        """Columns step, loss, lr, seconds (LOSS_SCHEMA), one row per recorded step; empty when none was."""
        return pa.table(
            {
                "step": pa.array([s.step for s in self.steps], pa.int64()),
                "loss": pa.array([s.loss for s in self.steps], pa.float64()),
                "lr": pa.array([s.lr for s in self.steps], pa.float64()),
                "seconds": pa.array([s.seconds for s in self.steps], pa.float64()),
            },
            schema=LOSS_SCHEMA,
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        pq.write_table(self.table(), path)
        return path


def read_losses(source: str | Path | pa.NativeFile) -> pa.Table:
    """A `losses` Parquet written by `LossCurve.write`; ValueError when its columns are not LOSS_SCHEMA's."""
    table = pq.read_table(source)
    if not table.schema.equals(LOSS_SCHEMA):
        raise ValueError(f"losses table has schema {table.schema}, expected {LOSS_SCHEMA}")
    return table
