"""The tiny pipeline on one Ray node vs a simulated 3-node cluster (docs/design.md §4, issue #7): the same cold
run, once on a local single-node Ray and once joined (`ray.address`) to a `ray.cluster_utils.Cluster` on this
machine — a CPU head, a worker advertising one (fake) GPU that the finetunes request, and a CPU-only worker.
Both get the same number of CPU slots (3), so the difference is the cost of multi-node scheduling and
placement (finetunes serialised on the one GPU), not of more hardware. The cluster is started outside the
measurement, as a deployed cluster would be; the single node pays for starting its Ray, as in `many run`.

    python -m benchmarks.cluster [--smoke] [--json PATH]     # smoke: 1 task, method many only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import EXAMPLES, quiet_environment, timed, warm_up_prefect

NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
CPU_SLOTS = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 task of examples/tiny.yaml, method many only")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="many-bench-cluster-"))
    quiet_environment(scratch)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers inherit it: no thread oversubscription of 3 slots
    from ray.cluster_utils import Cluster

    from flows.config import load_config
    from flows.pipeline import continual_update
    from tasks.runtime import PROJECT_ROOT

    config = load_config(EXAMPLES / "tiny.yaml")
    if args.smoke:
        config = config.first(1).model_copy(update={"methods": ("many",)})

    warm_up_prefect()

    def timed_run(store: str, **updates) -> tuple[float, dict]:
        cfg = config.model_copy(update={"store": config.store.model_copy(update={"url": str(scratch / store)}), **updates})
        print(f"  {len(cfg.tasks)} tasks into {store} …", file=sys.stderr, flush=True)
        summary, seconds = timed(lambda: continual_update(cfg))
        return seconds, summary

    one_node, single = timed_run("one-node", ray=config.ray.model_copy(update={"address": None, "num_cpus": CPU_SLOTS}))

    paths = [str(PROJECT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    gpu = cluster.add_node(**NODE_ARGS, num_gpus=1)
    cluster.add_node(**NODE_ARGS)
    cluster.wait_for_nodes()
    cluster_start = time.perf_counter() - start
    try:
        resources = config.resources.model_copy(
            update={"finetune": config.resources.finetune.model_copy(update={"num_gpus": 1.0})}
        )
        three_nodes, multi = timed_run("three-nodes", ray=config.ray.model_copy(update={"address": cluster.address}),
                                         resources=resources)
    finally:
        cluster.shutdown()
    on_gpu = sum(s["stage"] in ("finetune", "seqlora") and s["node"].endswith(gpu.node_id[:12]) for s in multi["stages"])
    finetunes = sum(s["stage"] in ("finetune", "seqlora") for s in multi["stages"])

    stream = f"examples/tiny.yaml, {len(config.tasks)} tasks, methods: {', '.join(config.methods)}"
    print(f"Stream: {stream}; {len(single['stages'])} stages computed per run, {CPU_SLOTS} CPU slots each. "
          f"Cluster start (not in the timing): {cluster_start:.1f} s; finetunes on the GPU-resource node: "
          f"{on_gpu}/{finetunes}.\n")
    print("| setup | nodes | seconds | vs 1 node |\n|---|---|---|---|")
    print(f"| local Ray, `num_cpus: {CPU_SLOTS}` | 1 | {one_node:.1f} | 1.00 |")
    print(f"| `ray.cluster_utils.Cluster`: head + fake-GPU worker + CPU worker | 3 | {three_nodes:.1f} | "
          f"{three_nodes / one_node:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "stream": stream, "seconds": {"one_node": one_node, "three_nodes": three_nodes, "cluster_start": cluster_start},
            "stages": len(single["stages"]), "finetunes_on_gpu_node": on_gpu, "finetunes": finetunes,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
