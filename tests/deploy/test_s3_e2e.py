"""The whole tiny pipeline with its store AND its growing task stream on a moto S3 server over HTTP (issue #7
§1, §5): two scheduled runs of the deployment's flow (called as the scheduler calls it, with the deployment's
parameters), the second computing nothing; a task spec uploaded between runs → the next run computes exactly
that task's stages, its merge and its eval row; `many export` from S3 gives the standard artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import yaml

from flows.cli import main
from flows.serve import deployment, scheduled_update
from tests.deploy.conftest import computed, tiny

pytestmark = pytest.mark.slow
METHODS = ["many", "individual"]


def upload(bucket: str, key: str, spec: object) -> None:
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=yaml.safe_dump(spec).encode())


def new_task_stages(task: str) -> set[tuple[str, str | None, str | None]]:
    return {("data", task, None), ("finetune", task, None), ("prototypes", task, None), ("stats", task, None),
            ("merge", task, "many"), ("merge_diagnostics", task, "many")} | {("eval", task, m) for m in METHODS}


def test_scheduled_runs_pick_up_new_task_specs_from_s3_and_export(harness, new_bucket: str, tmp_path: Path) -> None:
    config = {key: value for key, value in tiny(methods=METHODS).items() if key != "tasks"}
    config |= {"task_source": {"url": f"s3://{new_bucket}/stream"}, "store": {"url": f"s3://{new_bucket}/store"}}
    config_path = tmp_path / "continual.yaml"
    config_path.write_text(yaml.safe_dump(config))
    upload(new_bucket, "stream/001-style-cls.yaml", "style-cls")
    upload(new_bucket, "stream/002-chart-qa.yaml", {"kind": "chart-qa"})

    scheduled = deployment(str(config_path), None, "*/10 * * * *")
    first = scheduled_update(**scheduled.parameters)
    assert first["tasks"] == ["001-style-cls", "002-chart-qa"]  # file-name order, names from the file stems
    assert {s["status"] for s in first["stages"]} == {"computed"} and first["ray_started"] is True

    second = scheduled_update(**scheduled.parameters)
    assert {s["status"] for s in second["stages"]} == {"cached"} and second["ray_started"] is False
    assert second["report"] == first["report"]

    upload(new_bucket, "stream/003-icon-qa.yaml", {"kind": "icon-qa"})
    third = scheduled_update(**scheduled.parameters)
    assert third["tasks"] == [*first["tasks"], "003-icon-qa"]
    assert computed(third) == new_task_stages("003-icon-qa")
    for method, row in third["report"]["methods"].items():
        assert row["matrix"][:2] == [r[:2] + [None] for r in first["report"]["methods"][method]["matrix"]]

    out = tmp_path / "export"
    assert main(["export", "--store", f"s3://{new_bucket}/store", "--out", str(out)]) == 0
    for task in third["tasks"]:
        assert (out / "tasks" / task / "adapter" / "adapter_config.json").is_file()
        assert (out / "tasks" / task / "projector.safetensors").is_file()
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert merge["tasks"] == third["tasks"]
    # every layer of the tiny model is dense by t = 3 (docs/design.md §1.1): Σr = 8·3 per layer, exported exactly
    assert all(e["rank"] == 8 * 3 and e["form"] == "dense" and e["error"] == 0.0 for e in merge["export"].values())
    ranks = [e["exported_rank"] for e in merge["export"].values()]
    assert json.loads((out / "merged" / "adapter" / "adapter_config.json").read_text())["r"] == max(set(ranks), key=ranks.count)
    assert (out / "base" / "config.json").is_file() and (out / "prototypes.parquet").is_file()
