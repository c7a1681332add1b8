"""The local cluster's priority gate (tasks/gate.py): stages are admitted most urgent first, never more CPUs than
the cluster has, and an abandoned run's waiters stop waiting."""

from __future__ import annotations

import threading
import time

from tasks.gate import PriorityGate, stage_priority


def test_waiters_are_admitted_by_priority_then_arrival() -> None:
    gate = PriorityGate(1)
    admitted: list[str] = []
    release = threading.Event()

    def holder() -> None:
        with gate.slot(1, (9, 9)):
            release.wait()

    def waiter(name: str, priority: tuple[int, int]) -> None:
        with gate.slot(1, priority):
            admitted.append(name)

    first = threading.Thread(target=holder)
    first.start()
    time.sleep(0.1)
    order = [("eval", (3, 0)), ("merge", (2, 1)), ("seqlora-2", (0, 2)), ("finetune", (1, 0)), ("seqlora-1", (0, 1)),
             ("merge-again", (2, 1))]
    threads = [threading.Thread(target=waiter, args=item) for item in order]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # arrival order as listed
    release.set()
    for thread in (first, *threads):
        thread.join(10)
    assert admitted == ["seqlora-1", "seqlora-2", "finetune", "merge", "merge-again", "eval"]


def test_never_more_cpus_than_the_capacity() -> None:
    gate = PriorityGate(2)
    lock, running, peak = threading.Lock(), [0], [0]

    def stage(cpus: float, t: int) -> None:
        with gate.slot(cpus, (2, t)):
            cpus = min(cpus, 2)  # a stage wider than the cluster holds all of it
            with lock:
                running[0] += cpus
                peak[0] = max(peak[0], running[0])
            time.sleep(0.02)
            with lock:
                running[0] -= cpus

    threads = [threading.Thread(target=stage, args=(1 + (t % 2), t)) for t in range(12)]  # 1- and 2-CPU stages
    threads.append(threading.Thread(target=stage, args=(8, 99)))  # more than the cluster: admitted alone
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] <= 2 and running[0] == 0 and gate._free == 2


def test_an_abandoned_waiter_stops_waiting_without_the_slot() -> None:
    gate = PriorityGate(1)
    abandoned, entered = threading.Event(), []
    with gate.slot(1, (0, 0)):
        waiter = threading.Thread(target=lambda: gate.slot(1, (1, 0), abandoned.is_set).__enter__() or entered.append(1))
        waiter.start()
        time.sleep(0.1)
        assert not entered
        abandoned.set()
        waiter.join(5)
        assert entered == [1] and gate._free == 0  # it ran the body (where the caller raises), holding nothing
    assert gate._free == 1 and not gate._waiting


def test_priorities_put_the_critical_path_first() -> None:
    ranked = sorted([("eval", 5), ("eval", 1), ("merge", 0), ("stats", 2), ("finetune", 3), ("finetune", 0),
                     ("seqlora", 4), ("seqlora", 1), ("base", None), ("prototypes", 0)],
                    key=lambda s: stage_priority(*s))
    assert ranked == [("base", None), ("seqlora", 1), ("seqlora", 4), ("finetune", 0), ("finetune", 3),
                      ("merge", 0), ("prototypes", 0), ("stats", 2), ("eval", 5), ("eval", 1)]
