"""A multi-node Ray cluster on one machine (issue #7 §3–4, docs/design.md §4): `ray.cluster_utils.Cluster` with a
CPU head, a worker advertising one (fake) GPU and a CPU-only worker; the tiny stream joins it by
`ray.address`. Finetunes ask for a GPU and must land on a GPU node (running on its CPU: the node has no
CUDA); merges ask for CPU only and must land elsewhere. The GPU worker is killed while it runs a finetune and
a replacement joins (what an autoscaler does for a preempted node): Prefect's retry reruns the lost stage and
the run completes with a correct summary; a rerun is fully cached."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.config import parse_config
from flows.pipeline import continual_update
from tasks.runtime import PROJECT_ROOT
from tests.deploy.conftest import computed, tiny

pytestmark = pytest.mark.slow
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def cluster(harness) -> Iterator:
    from ray.cluster_utils import Cluster

    # Worker processes inherit the environment of the node that starts them: make the project importable.
    paths = [str(PROJECT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ["OMP_NUM_THREADS"] = "1"
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    cluster.gpu_nodes = [cluster.add_node(**NODE_ARGS, num_gpus=1)]
    cluster.cpu_node = cluster.add_node(**NODE_ARGS)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        import ray

        ray.shutdown()  # the cluster refuses to remove the head while a driver is connected to it
        cluster.shutdown()


def short(node) -> str:
    return node.node_id[:12]


def replace_gpu_node_once_busy(cluster, run: threading.Thread) -> None:
    """Once the only GPU is taken (a finetune runs), start a replacement GPU node and remove the busy one.
    Runs in the main thread: starting a node installs signal handlers."""
    import ray

    while run.is_alive():
        # available_resources() omits a resource none of which is free
        if ray.is_initialized() and ray.cluster_resources().get("GPU") and "GPU" not in ray.available_resources():
            cluster.gpu_nodes.append(cluster.add_node(**NODE_ARGS, num_gpus=1))
            cluster.remove_node(cluster.gpu_nodes[0])
            return
        time.sleep(0.2)


def test_placement_follows_resources_and_a_lost_gpu_node_is_survived(cluster, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    config = parse_config(tiny(
        tasks=["style-cls", "chart-qa"], methods=["many"], retries=2, store={"url": str(tmp_path / "store")},
        ray={"address": cluster.address}, resources={"finetune": {"num_cpus": 1, "num_gpus": 1}},
    ))
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(summary=continual_update(config)))
    run.start()
    replace_gpu_node_once_busy(cluster, run)
    run.join()
    summary = result["summary"]
    assert len(cluster.gpu_nodes) == 2, "the GPU node was never busy: no finetune ran on it"

    assert {s["status"] for s in summary["stages"]} == {"computed"}
    assert computed(summary) == {("base", None, None)} | {
        (stage, task, method) for task in ("style-cls", "chart-qa")
        for stage, method in (("data", None), ("finetune", None), ("prototypes", None), ("stats", None),
                              ("merge", "many"), ("merge_diagnostics", "many"), ("eval", "many"))
    }
    gpu = {short(n) for n in cluster.gpu_nodes}
    node_of = {(s["stage"], s["task"]): s["node"].rsplit("/", 1)[-1] for s in summary["stages"]}
    assert {node_of["finetune", t] for t in ("style-cls", "chart-qa")} <= gpu
    assert {node_of["merge", t] for t in ("style-cls", "chart-qa")}.isdisjoint(gpu)
    assert {node_of["merge", t] for t in ("style-cls", "chart-qa")} <= {short(cluster.head_node), short(cluster.cpu_node)}
    assert all(v is not None for v in summary["report"]["methods"]["many"]["matrix"][1])

    with get_client(sync_client=True) as client:
        runs = {r.name: r.run_count for r in client.read_task_runs() if r.name.startswith("finetune[")}
    assert max(runs.values()) >= 2, f"no finetune was retried after its node died: {runs}"

    again = continual_update(config)
    assert {s["status"] for s in again["stages"]} == {"cached"} and again["report"] == summary["report"]
