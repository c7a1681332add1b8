"""Which runs `gc --keep-last N` keeps (docs/design.md §3.4): the retention rule, apart from any I/O.

Runs are compared within one config: the same `config_fingerprint` in their summaries (the settings that decide
what a stage computes — not the task list, not where or how it ran; `flows.retention.config_fingerprint`).
Summaries written before fingerprints existed form one group of their own. Within a config, a newer run
*supersedes* an older one when it ran the older one's tasks in the same order, possibly with more after them:
a stream that grew, or the same stream rerun after an upgrade or a replaced task's data. A run is kept unless at
least N newer runs supersede it. So a stream keeps its newest N runs, while a shorter trial (`--tasks 2`) never
evicts the longer stream before it, and two task orders never evict each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RunInfo:
    """What retention reads of a run summary, and when the summary was written (the store's clock)."""

    run_id: str
    fingerprint: str | None
    tasks: tuple[str, ...]
    stages: frozenset[tuple[str, str]]
    written: float

    def superseded_by(self, newer: RunInfo) -> bool:
        return (
            newer.fingerprint == self.fingerprint
            and newer.tasks[: len(self.tasks)] == self.tasks
            and (newer.written, newer.run_id) > (self.written, self.run_id)
        )


def kept_runs(runs: Iterable[RunInfo], keep_last: int) -> set[str]:
    """The ids of the runs that fewer than `keep_last` newer runs of their config supersede."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be a whole number ≥ 1 (or None: keep every run), got {keep_last!r}")
    runs = list(runs)
    return {run.run_id for run in runs if sum(run.superseded_by(other) for other in runs) < keep_last}
