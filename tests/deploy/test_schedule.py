"""The deployment wiring (issue #7 §1–2): `many serve`'s deployment object (cron + parameters), the
declarative deploy/prefect.yaml checked by Prefect's own models against the flow it names, the run config it
points at, and the Ray cluster launcher / KubeRay manifests checked against Ray's schema and each other."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.config import load_config
from flows.serve import deployment, run_config, scheduled_update
from tests.deploy.conftest import DEPLOY, tiny

ROOT = DEPLOY.parent


def test_serve_builds_a_cron_deployment_with_config_path_and_store() -> None:
    built = deployment("/etc/many/continual.yaml", "s3://bucket/store", "0 3 * * *", name="nightly")
    assert built.name == "nightly" and built.flow_name == "scheduled-update"
    assert [s.schedule.cron for s in built.schedules] == ["0 3 * * *"]
    assert built.parameters == {"config_path": "/etc/many/continual.yaml", "store_url": "s3://bucket/store"}
    assert set(built.parameters) == set(inspect.signature(scheduled_update.fn).parameters)


def test_run_config_applies_the_store_and_reads_the_stream(tmp_path: Path) -> None:
    (tmp_path / "stream").mkdir()
    (tmp_path / "stream" / "a.yaml").write_text("chart-qa")
    config = {k: v for k, v in tiny().items() if k != "tasks"} | {"task_source": {"url": str(tmp_path / "stream")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    resolved = run_config(str(tmp_path / "c.yaml"), str(tmp_path / "store"))
    assert [t.name for t in resolved.tasks] == ["a"] and resolved.store.url == str(tmp_path / "store")


def test_prefect_yaml_names_the_flow_with_valid_parameters_and_schedule() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    project = PrefectYamlModel.model_validate(yaml.safe_load((DEPLOY / "prefect.yaml").read_text()))
    [spec] = project.deployments
    path, _, name = spec.entrypoint.partition(":")
    loaded = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
    assert loaded.name == scheduled_update.name
    assert set(spec.parameters) <= set(inspect.signature(loaded.fn).parameters)
    assert load_config(ROOT / spec.parameters["config_path"]).task_source is not None
    [schedule] = spec.schedules
    Cron(schedule.cron)  # raises on a bad expression
    built = deployment(spec.parameters["config_path"], spec.parameters["store_url"], schedule.cron, spec.name)
    assert built.parameters == spec.parameters


def test_ray_cluster_and_kuberay_share_image_groups_and_version() -> None:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(launcher))  # Ray's own defaults and schema of the cluster launcher
    kuberay = yaml.safe_load((DEPLOY / "kuberay.yaml").read_text())
    spec = kuberay["spec"]
    assert spec["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {t.replace("_", "-") for t in launcher["available_node_types"] if t != "head"}
    pods = [spec["headGroupSpec"], *groups.values()]
    images = {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}
    assert images == {launcher["docker"]["image"]}
    assert "ghcr.io/my-org/many:0.1.0" in (DEPLOY / "prefect.yaml").read_text()
    gpu = groups["gpu-finetune"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and launcher["available_node_types"]["gpu_finetune"]["resources"]["GPU"] == 1
    assert "nvidia.com/gpu" not in groups["cpu-merge"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert launcher["available_node_types"]["gpu_finetune"]["min_workers"] >= 1 <= groups["gpu-finetune"]["minReplicas"]


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--cron", "every tuesday"], "many: error: bad --cron 'every tuesday'"),
    (["serve", "--cron", "0 * * * *", "--config", "/no/such.yaml"], "many: error: config file not found: /no/such.yaml"),
    (["serve"], "many: error: many serve: one of the arguments --cron --interval is required"),
], ids=["bad-cron", "missing-config", "no-schedule"])
def test_serve_rejects_bad_input_with_exit_2(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().startswith(message)
