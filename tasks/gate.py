"""Critical path first on a local cluster (docs/design.md §4 "Ray"): the driver admits computing stages to Ray by
priority, at most as many CPUs at once as the cluster has, so Ray never holds a queue of its own and the next free
core goes to the most urgent stage waiting, not to whichever thread called Ray first.

On a cold run the critical path is base → finetune[0] → seqlora[1] → … → seqlora[T−1] → its last evals: each SeqLoRA
link waits for the previous one, while finetunes, statistics, merges and evals can fill the cores around it. Left to
Ray's own queue (roughly first come, first served) a ready chain link waited behind every stage submitted before it.
Priorities (`stage_priority`, lower first): the base and the training chains' links, then the finetunes, then the
other per-task stages and merge chains (earlier tasks first), then the evals (later rows first: they score more
tasks). Only the order changes: every stage still computes the same bytes from the same inputs.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import threading
from collections.abc import Callable, Iterator

Priority = tuple[int, int]


@functools.cache
def training_chains() -> frozenset[str]:
    """The base and every row's training chain (its links run on the finetune resources: SeqLoRA, CRAM,
    Fwd-Prompt), whose links each wait for the previous one."""
    from tasks.rows import chains

    return frozenset({"base"} | {name for name, chain in chains().items() if chain.group == "finetune"})


def stage_priority(stage: str, t: int | None) -> Priority:
    """The rank of `stage` for task index `t` (None for the base); lower runs first."""
    t = t or 0
    if stage in training_chains():
        return (0, t)
    if stage in ("finetune", "adapter"):
        return (1, t)  # finetune[0] first: seqlora[1] reads it
    if stage == "eval":
        return (3, -t)  # the longest evals first
    return (2, t)


class PriorityGate:
    """At most `capacity` CPUs admitted at once; waiters are admitted lowest priority first (then first come)."""

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self._free = capacity
        self._cond = threading.Condition()
        self._waiting: list[tuple[Priority, int]] = []
        self._order = itertools.count()

    @contextlib.contextmanager
    def slot(self, cpus: float, priority: Priority, give_up: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold `cpus` (at most the capacity) of the gate while the body runs; waits until this waiter is the most
        urgent one and that many are free. `give_up` is polled while waiting: when it says so, the wait ends
        without the slot and the body runs at once (the caller raises there)."""
        need = min(cpus, self.capacity)
        entry = (priority, next(self._order))
        with self._cond:
            heapq.heappush(self._waiting, entry)
            while not (self._waiting[0] == entry and self._free >= need):
                if give_up():
                    self._waiting.remove(entry)
                    heapq.heapify(self._waiting)
                    self._cond.notify_all()
                    need = 0
                    break
                self._cond.wait(0.5)
            else:
                heapq.heappop(self._waiting)
                self._free -= need
                self._cond.notify_all()  # the next waiter may fit in what is left
        try:
            yield
        finally:
            with self._cond:
                self._free += need
                self._cond.notify_all()
