"""The growing task stream (flows/stream.py): order by file name or manifest, names from file stems, the
same on a local directory and an S3 prefix (moto), and one-line errors naming the source and the file."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import yaml

from flows.config import ConfigError, TaskSourceConfig, TaskSpec, parse_config
from flows.stream import read_stream, with_stream


def write(root: Path, files: dict[str, object]) -> Path:
    """Spec files under `root`; a string is written as it is, anything else as YAML."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name).write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return root


def names(specs: tuple[TaskSpec, ...]) -> list[str]:
    return [s.name for s in specs]


def test_file_name_order_and_stem_names(tmp_path: Path) -> None:
    root = write(tmp_path / "stream", {
        "002-chart.yaml": {"kind": "chart-qa"}, "001-shapes.yaml": "style-cls",
        "003.yml": {"name": "icons", "kind": "icon-qa"}, "notes.txt": "not a spec",
    })
    specs = read_stream(TaskSourceConfig(url=str(root)))
    assert names(specs) == ["001-shapes", "002-chart", "icons"]
    assert [s.kind for s in specs] == ["style-cls", "chart-qa", "icon-qa"]
    assert read_stream(TaskSourceConfig(url=f"file://{root}")) == specs


def test_manifest_orders_and_publishes(tmp_path: Path) -> None:
    root = write(tmp_path / "stream", {
        "a.yaml": "style-cls", "b.yaml": "chart-qa", "c.yaml": "icon-qa", "manifest.yaml": ["c.yaml", "a.yaml"],
    })
    assert names(read_stream(TaskSourceConfig(url=str(root)))) == ["c", "a"]  # b.yaml is uploaded, not published
    (root / "manifest.yaml").write_text(yaml.safe_dump(["c.yaml", "a.yaml", "b.yaml"]))
    assert names(read_stream(TaskSourceConfig(url=str(root)))) == ["c", "a", "b"]


def test_s3_prefix_grows(new_bucket: str) -> None:
    s3 = boto3.client("s3")
    source = TaskSourceConfig(url=f"s3://{new_bucket}/stream")
    with pytest.raises(ConfigError, match=rf"^task_source s3://{new_bucket}/stream: no task specs yet"):
        read_stream(source)
    s3.put_object(Bucket=new_bucket, Key="stream/01-shapes.yaml", Body=b"style-cls")
    assert names(read_stream(source)) == ["01-shapes"]
    s3.put_object(Bucket=new_bucket, Key="stream/02-chart.yaml", Body=b"kind: chart-qa")
    assert names(read_stream(source)) == ["01-shapes", "02-chart"]


def test_with_stream_replaces_tasks_and_keeps_the_rest(tmp_path: Path) -> None:
    root = write(tmp_path / "stream", {"1.yaml": "chart-qa", "2.yaml": "icon-qa"})
    config = parse_config({"task_source": {"url": str(root)}, "methods": ["many"], "lpm": {"gamma": 0.01}})
    resolved = with_stream(config)
    assert names(resolved.tasks) == ["1", "2"] and resolved.task_source is None
    assert resolved.methods == ("many",) and resolved.lpm == config.lpm
    plain = parse_config({"tasks": ["chart-qa"]})
    assert with_stream(plain) is plain


@pytest.mark.parametrize(("files", "message"), [
    ({}, "task_source {url}: no task specs yet; add one YAML file per task"),
    ({"a.yaml": "kind: [unclosed"}, "{url}/a.yaml: malformed YAML"),
    ({"a.yaml": {"kind": "chart-qa", "steps": 3}}, "{url}/a.yaml: steps: unknown key"),
    ({"a.yaml": "no-such-kind"}, "{url}/a.yaml: task 'a': unknown task kind 'no-such-kind'"),
    ({"a.yaml": "chart-qa", "manifest.yaml": ["a.yaml", "b.yaml"]},
     "{url}/manifest.yaml: lists b.yaml, which is not in {url}; upload it first"),
    ({"a.yaml": "chart-qa", "manifest.yaml": {"a": 1}}, "{url}/manifest.yaml: must be a YAML list of spec file names"),
    ({"a.yaml": {"name": "x", "kind": "chart-qa"}, "b.yaml": {"name": "x", "kind": "icon-qa"}},
     "task_source {url}: tasks: task names must be unique; repeated: ['x']"),
], ids=["empty", "malformed", "unknown-key", "unknown-kind", "manifest-missing-file", "manifest-not-a-list", "duplicate"])
def test_bad_streams(tmp_path: Path, files: dict, message: str) -> None:
    root = write(tmp_path / "stream", files)
    url = f"file://{root}"
    with pytest.raises(ConfigError) as error:
        with_stream(parse_config({"task_source": {"url": url}}))
    assert str(error.value).startswith(message.format(url=url))


def test_missing_directory_and_tasks_given_twice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task_source .*/absent: no such directory; create it"):
        read_stream(TaskSourceConfig(url=str(tmp_path / "absent")))
    assert not (tmp_path / "absent").exists()
    with pytest.raises(ConfigError, match=r"<config>: <top level>: give either tasks or task_source"):
        parse_config({"tasks": ["chart-qa"], "task_source": {"url": str(tmp_path)}})
