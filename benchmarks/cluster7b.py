"""One merge step at LLaVA-1.5-7B shapes, all 32 decoder blocks, fanned out over a simulated 3-node Ray cluster
(issue #17, deliverable 6; a part of benchmarks.perf: `--parts 7b-cluster`).

The shapes examples/ucit-llava7b.yaml implies: hidden 4096, MLP 11008, LoRA r = 8 on q/k/v/o/gate/up/down of each
of the 32 blocks, so 4 input groups per block (q/k/v, o, gate/up, down) — 128 jobs. Each job is the merge stage's
own `tasks.merge.merge_group` (absorb + export + write the group's state and factors, one torch thread) on synthetic
inputs the job writes first on its node (a seeded LoRA per layer and an SPD Gram XᵀX/N + 0.01·I, float32, as the
stats stage stores them), and every file it wrote is measured and deleted before it returns: streamed, one group's
files at a time per job, never the model's. Jobs go to `ray.cluster_utils.Cluster` nodes (a head and two workers)
of `--7b-cluster-cpus` CPUs and a Ray `memory` resource of `--7b-cluster-node-gib` GiB each; every job reserves
its working set (`tasks.merge.job_bytes`, capped at a node's memory) as the merge stage does, so a node runs as many
jobs at once as its CPUs *and* memory admit. A sampler reads every node's process tree (its raylet and the workers
under it) every 0.2 s: the peak above the node's idle tree (workers started, torch imported) is what the jobs used,
to compare with the node's `memory` resource.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.synthetic import Shape
from many.config import LPMConfig

GiB = 2**30


@dataclass(frozen=True)
class Job:
    block: int
    group: str  # "qkv", "o", "gate_up", "down"
    layers: tuple[tuple[str, int, int], ...]  # (PEFT name, out, in)


def jobs(shape: Shape) -> list[Job]:
    """The input groups of every block, the largest (down, 11008 inputs) first so the cluster packs them early."""
    groups: dict[str, list[tuple[str, int, int]]] = {}
    for name, (n_out, n_in, group) in shape.modules().items():
        groups.setdefault(group, []).append((name, n_out, n_in))
    out = [Job(int(group.split(".")[-2]), group.rsplit(".", 1)[-1], tuple(layers)) for group, layers in groups.items()]
    return sorted(out, key=lambda job: -job.layers[0][2])


def run_job(job: Job, rank: int, seed: int, config: LPMConfig, scratch: str) -> dict[str, Any]:
    """Write the job's synthetic inputs, run tasks.merge.merge_group on them, measure, delete. On a Ray worker."""
    import ray
    import torch
    from safetensors.torch import save_file

    from many.stats import save_grams
    from tasks.merge import GroupJob, job_bytes, merge_group

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix=f"b{job.block}-{job.group}-", dir=scratch))
    try:
        generator = torch.Generator().manual_seed(seed * 1000 + 4 * job.block + ("qkv", "o", "gate_up", "down").index(job.group))
        n_in, tokens = job.layers[0][2], 256
        x = torch.randn(tokens, n_in, generator=generator)
        gram = x.T @ x / tokens  # (in, in) float32
        gram.diagonal().add_(1e-2)
        del x
        key = job.layers[0][0]
        grams_file = save_grams({name: gram for name, _, _ in job.layers}, workdir / "grams.safetensors")
        del gram
        factors = {}
        for name, n_out, _ in job.layers:
            factors[f"{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=generator) * 0.02
            factors[f"{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=generator) / n_in**0.5
        adapter_file = workdir / "adapter.safetensors"
        save_file(factors, str(adapter_file))
        del factors
        group_job = GroupJob(key, tuple(name for name, _, _ in job.layers), None)
        scales = {name: 2.0 for name, _, _ in job.layers}  # alpha / r = 16 / 8
        start = time.perf_counter()
        # the synthetic Gram stands in for the answer Gram too: the default merge reads both (LPMConfig.answer)
        merge_group(group_job, scales, str(adapter_file), str(grams_file), str(grams_file),
                    str(workdir / "state.safetensors"), str(workdir / "factors.safetensors"), config)
        seconds = time.perf_counter() - start
        return {
            "block": job.block, "group": job.group, "node": ray.get_runtime_context().get_node_id(),
            "seconds": seconds, "reserved": job_bytes(group_job, str(adapter_file), str(grams_file), answer=True),
            "state_bytes": (workdir / "state.safetensors").stat().st_size,
            "factors_bytes": (workdir / "factors.safetensors").stat().st_size,
            "gram_bytes": grams_file.stat().st_size, "adapter_bytes": adapter_file.stat().st_size,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _tree_rss(pid: int) -> int:
    """RSS of process `pid` and all its descendants (a simulated node: its raylet and the workers it started)."""
    total = 0
    with suppress(psutil.Error):
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            with suppress(psutil.Error):
                total += process.memory_info().rss
    return total


def _warm(node_id: str) -> int:
    import torch  # noqa: F401  (what an idle merge worker has loaded)

    return os.getpid()


def measure(shape: Shape, nodes: int, cpus: int, node_gib: float, config: LPMConfig, seed: int = 0) -> dict[str, Any]:
    """The step on a `nodes`-node simulated cluster; per-node peak tree RSS above idle, wall time, bytes."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    scratch = tempfile.mkdtemp(prefix="many-7b-cluster-")
    node_memory = int(node_gib * GiB)
    args = {"num_cpus": cpus, "memory": node_memory, "object_store_memory": 80 * 2**20}
    root = str(Path(__file__).resolve().parents[1])  # the workers import benchmarks.cluster7b from here
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**args)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        raylets = {node.node_id: node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}
        warm = ray.remote(_warm)
        # start every node's workers (torch imported) before measuring its idle tree
        ray.get([warm.options(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                 .remote(node) for node in raylets for _ in range(cpus)])
        time.sleep(1.0)
        idle = {node: _tree_rss(pid) for node, pid in raylets.items()}
        peaks = dict(idle)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for node, pid in raylets.items():
                    peaks[node] = max(peaks[node], _tree_rss(pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        remote = ray.remote(run_job)

        start = time.perf_counter()
        refs = [remote.options(num_cpus=1, max_retries=0, memory=min(_reserve(job, shape), node_memory))
                .remote(job, shape.rank, seed, config, scratch) for job in jobs(shape)]
        results = ray.get(refs)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    finally:
        with suppress(Exception):
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"nodes": nodes, "cpus": cpus, "node_memory": node_memory, "wall": wall, "jobs": results,
            "idle": idle, "peak": peaks}


def _reserve(job: Job, shape: Shape) -> int:
    """tasks.merge.job_bytes of a first step, from the shapes (the files do not exist before the job writes them)."""
    n_in = job.layers[0][2]
    return 8 * (3 * n_in * n_in + sum(2 * (n_out + n_in) * shape.rank for _, n_out, _ in job.layers))


def report(shape: Shape, result: dict[str, Any], config: LPMConfig) -> list[tuple[str, float, str, bool]]:
    """Print the part's tables; return its goal rows (name, measured, goal text, met)."""
    jobs_ = result["jobs"]
    node_memory = result["node_memory"]
    what = "LLaVA-1.5-7B shapes" if (shape.hidden, shape.intermediate) == (4096, 11008) else "smoke shapes"
    print(f"{what} (hidden {shape.hidden}, MLP {shape.intermediate}, r={shape.rank} on q/k/v/o/gate/up/down), all "
          f"{shape.layers} of 32 blocks = {len(jobs_)} input-group jobs of one merge step (t = 1), on a simulated "
          f"{result['nodes']}-node `ray.cluster_utils.Cluster`, each node {result['cpus']} CPUs and a Ray `memory` "
          f"resource of {node_memory / GiB:.2f} GiB; C stored {config.state_dtype}; each job writes its inputs, runs "
          "tasks.merge.merge_group and deletes its files (streamed). Wall time "
          f"{result['wall'] / 60:.1f} min on this shared 2-core box (the CPU slots are oversubscribed).\n")
    print("| node | jobs | job seconds (sum) | idle tree (GiB) | peak tree (GiB) | peak above idle (GiB) "
          "| node `memory` (GiB) | above idle / memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows, worst = [], 0.0
    for i, node in enumerate(result["peak"]):
        mine = [j for j in jobs_ if j["node"] == node]
        above = result["peak"][node] - result["idle"][node]
        worst = max(worst, above / node_memory)
        print(f"| {i} ({node[:8]}) | {len(mine)} | {sum(j['seconds'] for j in mine):.0f} | {result['idle'][node] / GiB:.2f} "
              f"| {result['peak'][node] / GiB:.2f} | {above / GiB:.2f} | {node_memory / GiB:.1f} | {above / node_memory:.2f} |")
    stored = {k: sum(j[k] for j in jobs_) for k in ("state_bytes", "factors_bytes", "gram_bytes", "adapter_bytes")}
    largest = max(jobs_, key=lambda j: j["reserved"])
    full = 32 / shape.layers  # every block has the same four jobs: bytes and job seconds scale with the blocks
    print(f"\nBytes of the step ({shape.layers} blocks; × {full:g} for 32): state {stored['state_bytes'] / 1e9:.2f} GB "
          f"(C, B, A·G̃ per group) → {full * stored['state_bytes'] / 1e9:.1f} GB, merged factors "
          f"{stored['factors_bytes'] / 1e9:.3f} → {full * stored['factors_bytes'] / 1e9:.2f} GB, inputs: Grams "
          f"{stored['gram_bytes'] / 1e9:.2f} → {full * stored['gram_bytes'] / 1e9:.1f} GB, adapter "
          f"{stored['adapter_bytes'] / 1e9:.3f} → {full * stored['adapter_bytes'] / 1e9:.2f} GB. Job CPU-slot seconds "
          f"{sum(j['seconds'] for j in jobs_):.0f} → {full * sum(j['seconds'] for j in jobs_) / 60:.0f} min for 32 "
          f"blocks (÷ the cluster's slots for its wall time). Largest job reserves {largest['reserved'] / GiB:.2f} GiB "
          f"({largest['group']}, tasks.merge.job_bytes); slowest job {max(j['seconds'] for j in jobs_):.0f} s.\n")
    rows.append((f"7B-shaped step, {shape.layers} blocks on {result['nodes']} nodes: peak per node above idle / node memory "
                 f"({node_memory / GiB:.2f} GiB)",
                 worst, "≤ 1", worst <= 1.0))
    return rows


def main_part(smoke: bool, cpus: int, node_gib: float, state_dtype: str, blocks: int = 32) -> tuple[list, dict]:
    shape = Shape(2, 64, 172, 8) if smoke else Shape(blocks, 4096, 11008, 8)
    config = LPMConfig(state_dtype=state_dtype)
    print("  7b-cluster: starting a 3-node Ray cluster …", file=sys.stderr, flush=True)
    result = measure(shape, 3, cpus, 0.25 if smoke else node_gib, config)
    return report(shape, result, config), result
