"""Task data (docs/design.md §7): the sample schema, the synthetic mini-UCIT stream, Parquet IO, the LLaVA/UCIT JSON
loader and validation."""

from many.data.draw import png_bytes
from many.data.io import SAMPLE_SCHEMA, read_samples, read_task, write_samples, write_task
from many.data.llava_json import load_llava_json
from many.data.mini_ucit import (
    PRETRAIN_PROMPT,
    PUNCTUATION,
    TASK_KINDS,
    UCIT_ORDER,
    MiniUcitConfig,
    TaskKind,
    make_task,
    pretrain_samples,
    task_kind,
    tokens,
    vocabulary,
    words,
)
from many.data.schema import Metric, Sample, TaskData
from many.data.validate import DataError, decode_image, validate_samples

__all__ = [
    "PRETRAIN_PROMPT",
    "PUNCTUATION",
    "SAMPLE_SCHEMA",
    "TASK_KINDS",
    "UCIT_ORDER",
    "DataError",
    "Metric",
    "MiniUcitConfig",
    "Sample",
    "TaskData",
    "TaskKind",
    "decode_image",
    "load_llava_json",
    "make_task",
    "png_bytes",
    "pretrain_samples",
    "read_samples",
    "read_task",
    "task_kind",
    "tokens",
    "validate_samples",
    "vocabulary",
    "words",
    "write_samples",
    "write_task",
]
