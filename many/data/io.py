"""Task data as Parquet (docs/design.md §3, §7): one row per sample (sample_id, image PNG bytes, prompt, answer);
a task is a directory with train.parquet, test.parquet and task.json ({"name", "metric"}).

`where` is a local path or a binary file object (an fsspec file works: it is used duck-typed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from many.data.schema import Metric, Sample, TaskData
from many.data.validate import DataError

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
    ]
)
SPLITS = ("train", "test")
TASK_FILE = "task.json"

Where = str | Path | BinaryIO


def write_samples(samples: tuple[Sample, ...] | list[Sample], where: Where) -> None:
    columns = {name: [getattr(sample, name) for sample in samples] for name in SAMPLE_SCHEMA.names}
    pq.write_table(pa.table(columns, schema=SAMPLE_SCHEMA), where)


def read_samples(where: Where) -> tuple[Sample, ...]:
    try:
        table = pq.read_table(where)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(
            f"{_name(where)} is not a readable Parquet file ({error}); rewrite it with write_samples"
        ) from error
    missing = [
        f"{field.name}: {field.type}"
        for field in SAMPLE_SCHEMA
        if field.name not in table.schema.names
        or table.schema.field(field.name).type != field.type
        or table.column(field.name).null_count
    ]
    if missing:
        raise DataError(
            f"{_name(where)} does not have the sample schema: missing, mistyped or null columns {missing}; "
            "write it with write_samples"
        )
    rows = table.select(SAMPLE_SCHEMA.names).to_pydict()
    return tuple(Sample(*values) for values in zip(*(rows[name] for name in SAMPLE_SCHEMA.names)))


def write_task(task: TaskData, directory: str | Path) -> None:
    """Write the splits first and task.json last: a directory with task.json is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_samples(task.train, directory / "train.parquet")
    write_samples(task.test, directory / "test.parquet")
    (directory / TASK_FILE).write_text(json.dumps({"name": task.name, "metric": task.metric}, sort_keys=True))


def read_task(directory: str | Path) -> TaskData:
    directory = Path(directory)
    path = directory / TASK_FILE
    if not path.is_file():
        raise DataError(f"no {TASK_FILE} in task directory {directory}; write the task with write_task")
    header = json.loads(path.read_text())
    if header.get("metric") not in get_args(Metric) or not isinstance(header.get("name"), str):
        raise DataError(f"{path} must hold a string name and a metric in {get_args(Metric)}; got {header}")
    train, test = (read_samples(directory / f"{split}.parquet") for split in SPLITS)
    return TaskData(header["name"], header["metric"], train, test)


def _name(where: Where) -> str:
    return str(where) if isinstance(where, str | Path) else str(getattr(where, "name", "<file object>"))
