"""One METEOR scorer per process, reused by every caption score (docs/design.md §1.3).

pycocoevalcap's `Meteor` starts a JVM that loads METEOR's paraphrase tables: ~6–7 s of CPU on 2 busy cores, against
milliseconds for the scoring itself. Started once per caption task, that start was most of an eval stage's time;
here the first caption score of a process starts it and every later one — in the same eval stage or in later
stages of the same Ray worker — reuses it. METEOR's `EVAL` line carries every statistic it scores, so the JVM keeps
no state between calls and a reused scorer returns exactly what a fresh one does (tests/many/test_meteor.py).

A JVM that died (its pipe broke) is replaced once and the call retried; the JVM is stopped when the process exits.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping, Sequence
from typing import Any

_lock = threading.Lock()  # one call at a time: the JVM answers one EVAL line after another
_scorer: Any = None  # pycocoevalcap.meteor.meteor.Meteor, or None before the first call / after stop()


def meteor(gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Sequence[str]]) -> float:
    """Corpus-level METEOR of tokenized captions: `res[i]` one hypothesis, `gts[i]` its references (pycocoevalcap's
    `Meteor.compute_score` layout), scored by this process's shared JVM."""
    global _scorer
    with _lock:
        for attempt in range(2):
            if _scorer is None or _scorer.meteor_p.poll() is not None:
                _stop_locked()
                from pycocoevalcap.meteor.meteor import Meteor

                _scorer = Meteor()
            try:
                score, _ = _scorer.compute_score(dict(gts), dict(res))
                return float(score)
            except (BrokenPipeError, ValueError, OSError):  # the JVM died mid-call (ValueError: an empty answer line)
                _scorer.lock = threading.Lock()  # compute_score left its lock held; Meteor.__del__ takes it
                _stop_locked()
                if attempt:
                    raise
    raise AssertionError("unreachable")


def started() -> bool:
    """Whether this process has a METEOR JVM running now."""
    return _scorer is not None and _scorer.meteor_p.poll() is None


def stop() -> None:
    """Stop this process's METEOR JVM (the next score starts a new one)."""
    with _lock:
        _stop_locked()


def _stop_locked() -> None:
    global _scorer
    scorer, _scorer = _scorer, None
    if scorer is not None:
        try:
            scorer.meteor_p.stdin.close()
        except OSError:
            pass
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        scorer.meteor_p = _Stopped()  # Meteor.__del__ then has nothing left to stop


class _Stopped:
    """Stands in for a stopped JVM's Popen, so pycocoevalcap's `Meteor.__del__` is a no-op."""

    class _Pipe:
        def close(self) -> None:
            pass

    stdin = _Pipe()

    def kill(self) -> None:
        pass

    def wait(self) -> int:
        return 0

    def poll(self) -> int:
        return 0


atexit.register(stop)
