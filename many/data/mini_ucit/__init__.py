"""mini-UCIT: six synthetic tasks mirroring UCIT's stream, plus the base's generic pretraining mixture (captions and
generic questions, docs/design.md §7)."""

from many.data.mini_ucit.kind import MiniUcitConfig, TaskKind
from many.data.mini_ucit.stream import (
    PRETRAIN_PROMPT,
    TASK_KINDS,
    UCIT_ORDER,
    make_task,
    pretrain_samples,
    task_kind,
    vocabulary,
)
from many.data.mini_ucit.text import PUNCTUATION, tokens, words

__all__ = [
    "PRETRAIN_PROMPT",
    "PUNCTUATION",
    "TASK_KINDS",
    "UCIT_ORDER",
    "MiniUcitConfig",
    "TaskKind",
    "make_task",
    "pretrain_samples",
    "task_kind",
    "vocabulary",
    "tokens",
    "words",
]
