"""Parquet IO of samples and tasks (docs/design.md §3, §7): exact round trips, fixed schema, file objects, clear errors."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from many.data import (
    SAMPLE_SCHEMA,
    DataError,
    MiniUcitConfig,
    make_task,
    read_samples,
    read_task,
    write_samples,
    write_task,
)

TASK = make_task("count-math", MiniUcitConfig(n_train=7, n_test=3))


def test_samples_round_trip_with_the_fixed_schema(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    write_samples(TASK.train, path)
    schema = pq.read_schema(path)
    assert [(f.name, f.type, f.nullable) for f in schema] == [
        ("sample_id", pa.string(), False),
        ("image", pa.binary(), False),
        ("prompt", pa.string(), False),
        ("answer", pa.string(), False),
    ]
    assert schema.equals(SAMPLE_SCHEMA)
    assert read_samples(path) == TASK.train
    assert read_samples(str(path)) == TASK.train


def test_samples_round_trip_through_file_objects() -> None:
    buffer = io.BytesIO()
    write_samples(TASK.test, buffer)
    buffer.seek(0)
    assert read_samples(buffer) == TASK.test


def test_task_round_trip(tmp_path: Path) -> None:
    write_task(TASK, tmp_path / "count-math")
    assert sorted(p.name for p in (tmp_path / "count-math").iterdir()) == ["task.json", "test.parquet", "train.parquet"]
    header = json.loads((tmp_path / "count-math" / "task.json").read_text())
    assert header == {"metric": "exact_match", "name": "count-math"}
    assert read_task(tmp_path / "count-math") == TASK


def test_writing_is_deterministic(tmp_path: Path) -> None:
    write_samples(TASK.train, tmp_path / "a.parquet")
    write_samples(TASK.train, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_table(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


BAD_SAMPLE_FILES = [
    ("not parquet", lambda p: _write_bytes(p, b"no parquet here"), "train.parquet is not a readable Parquet file"),
    ("missing file", lambda p: p.parent / "absent.parquet", "absent.parquet is not a readable Parquet file"),
    (
        "missing column",
        lambda p: _write_table(p, {"sample_id": ["x"], "image": [b"png"], "prompt": ["q"]}),
        "missing, mistyped or null columns ['answer: string']",
    ),
    (
        "image as string",
        lambda p: _write_table(p, {"sample_id": ["x"], "image": ["png"], "prompt": ["q"], "answer": ["a"]}),
        "['image: binary']",
    ),
    (
        "null answer",
        lambda p: _write_table(
            p, {"sample_id": ["x"], "image": [b"png"], "prompt": ["q"], "answer": pa.array([None], pa.string())}
        ),
        "['answer: string']",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), BAD_SAMPLE_FILES, ids=[c[0] for c in BAD_SAMPLE_FILES])
def test_bad_sample_files_are_named(tmp_path: Path, case: str, make, message: str) -> None:
    path = make(tmp_path / "train.parquet")
    with pytest.raises(DataError, match=re.escape(message)):
        read_samples(path)


BAD_TASK_DIRS = [
    ("no task.json", lambda d: (d / "task.json").unlink(), "no task.json in task directory"),
    (
        "unknown metric",
        lambda d: (d / "task.json").write_text('{"name": "t", "metric": "bleu"}'),
        "metric in ('exact_match', 'caption')",
    ),
    ("missing split", lambda d: (d / "test.parquet").unlink(), "test.parquet is not a readable Parquet file"),
]


@pytest.mark.parametrize(("case", "damage", "message"), BAD_TASK_DIRS, ids=[c[0] for c in BAD_TASK_DIRS])
def test_bad_task_directories_are_named(tmp_path: Path, case: str, damage, message: str) -> None:
    write_task(TASK, tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=re.escape(message)):
        read_task(tmp_path)
