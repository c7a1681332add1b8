"""Performance summary (issue #8): the earlier issues' cost goals as ratios in one run, a 100-task synthetic merge
stream, and a LLaVA-1.5-7B-shaped merge step — all through the real stages and store.

  ratios  runs benchmarks.incremental, merge_cost, train_overhead and store_overhead (their own code, their JSON)
          and prints each goal as measured / goal. `--tiny-pipeline` runs the incremental part on
          examples/tiny.yaml instead of the default mini-UCIT stream (minutes instead of ~an hour on 2 cores).
  stream  100 synthetic tasks (random LoRAs r=8 and SPD Grams, no training) at the default tiny model's LoRA
          shapes through the real `merge` stage (benchmarks.synthetic.merge_stream): time, peak RSS, store
          size and state size per step vs t.
  7b      synthetic tasks at LLaVA-1.5-7B shapes (hidden 4096, MLP 11008, r=8 on q/k/v/o/gate/up/down) through the
          same stage as the pipeline runs it: a 1-CPU Ray task on a local Ray of `--7b-cpus` CPUs, which fans the
          input groups (q/k/v, o, gate/up, down of each block) out as 1-CPU Ray tasks on its node. On `--7b-layers`
          of the 32 decoder blocks (default 2: peak memory is concurrent groups × one group, whatever the blocks;
          time and bytes scale with the blocks); per step: time, peak RSS of the whole process tree (the driver,
          Ray's processes and its workers), bytes stored, extrapolated linearly to 32 blocks.

    python -m benchmarks.perf [--smoke] [--parts ratios,stream,7b] [--tasks N] [--7b-layers L] [--7b-tasks T]
                              [--7b-cpus N] [--7b-state-dtype float64|float32] [--tiny-pipeline] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.synthetic import Shape, Step, merge_stream, rss
from many.config import LPMConfig

PARTS = ("ratios", "stream", "7b")
GiB = 2**30
MB = 1e6


def sub_benchmark(module: str, argv: list[str], scratch: Path) -> dict[str, Any]:
    """Run `module`.main(argv + --json) with its printout swallowed; return its JSON."""
    out = scratch / f"{module.rsplit('.', 1)[-1]}.json"
    with contextlib.redirect_stdout(io.StringIO()):
        importlib.import_module(module).main([*argv, "--json", str(out)])
    return json.loads(out.read_text())


def ratios(smoke: bool, tiny_pipeline: bool, scratch: Path) -> tuple[list[tuple[str, float, str, bool]], dict]:
    """(name, measured, goal text, met) per goal of issues #2–#6, and the raw JSON of each benchmark."""
    flag = ["--smoke"] if smoke else []
    print("  ratios: incremental …", file=sys.stderr, flush=True)
    incremental = sub_benchmark("benchmarks.incremental", ["--smoke"] if smoke or tiny_pipeline else [], scratch)
    print("  ratios: merge_cost, train_overhead, store_overhead …", file=sys.stderr, flush=True)
    merge = sub_benchmark("benchmarks.merge_cost", flag, scratch)
    train = sub_benchmark("benchmarks.train_overhead", flag, scratch)
    store = sub_benchmark("benchmarks.store_overhead", flag, scratch)
    rows = [(f"incremental {name} ({incremental['stream']}, T={incremental['T']})", r["value"], f"≤ {r['goal']:.3f}",
             r["value"] <= r["goal"]) for name, r in incremental["goals"].items()]
    counts = [row["tasks"] for row in merge["rows"]]
    rows.append((f"merge step t={counts[-1]} / t={counts[0]} ({merge['features']}², r={merge['rank']})", merge["step_growth"],
                 f"≤ {merge['step_growth_goal']}", merge["step_growth"] <= merge["step_growth_goal"]))
    rows.append(("LPM step / bare solve (worst t)", merge["worst_step_over_bare"], f"≤ {merge['step_over_bare_goal']}",
                 merge["worst_step_over_bare"] <= merge["step_over_bare_goal"]))
    rows.append(("training loop steps/s / bare PyTorch loop", train["ratio"], f"≥ {train['goal_ratio']}",
                 train["ratio"] >= train["goal_ratio"]))
    rows += [(f"store put+materialize / plain fsspec ({row['backend']})", row["ratio"], f"≤ {store['goal']}", row["ratio"] <= store["goal"])
             for row in store["rows"]]
    return rows, {"incremental": incremental, "merge_cost": merge, "train_overhead": train, "store_overhead": store}


def run_stream(shape: Shape, tasks: int, scratch: Path, label: str, config: LPMConfig = LPMConfig(),
               on_ray: bool = False) -> list[Step]:
    from tasks.store import Store

    root = scratch / f"store-{label}"
    store = Store.open(str(root), cache_dir=scratch / f"cache-{label}")

    def progress(step: Step) -> None:
        print(f"  {label}: t={step.t} {step.seconds:.1f} s, peak RSS {step.peak_rss / GiB:.2f} GiB", file=sys.stderr, flush=True)

    try:
        return merge_stream(store, root, shape, tasks, scratch / f"inputs-{label}", config, progress, on_ray)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(scratch / f"cache-{label}", ignore_errors=True)


def run_7b(shape: Shape, tasks: int, cpus: int, config: LPMConfig, scratch: Path) -> tuple[list[Step], int]:
    """The 7B-shaped steps on a local Ray of `cpus` CPUs (started here, stopped after); and the process tree's RSS
    with Ray up and idle, before the first step."""
    from tasks.runtime import ensure_ray, shutdown_ray

    # the workers' materialised inputs go under scratch (removed after), and the variable is restored after
    with mock.patch.dict(os.environ, {"MANY_CACHE_DIR": str(scratch / "cache-7b")}):
        try:
            ensure_ray(None, cpus, 200)
            baseline = rss(tree=True)
            return run_stream(shape, tasks, scratch, "7b", config, on_ray=True), baseline
        finally:
            shutdown_ray()


def print_stream(shape: Shape, steps: list[Step]) -> None:
    marks = {1, 2, 5, 10, 20, 50, len(steps)}
    print(f"{len(steps)} synthetic tasks at {shape.layers} blocks × 7 LoRA layers (hidden {shape.hidden}, MLP "
          f"{shape.intermediate}, r={shape.rank}) through the real merge stage into a local store; peak RSS of the "
          "whole process during the step.\n")
    print("| t | step (s) | peak RSS (MiB) | state blob (MB) | store total (MB) |\n|---:|---:|---:|---:|---:|")
    for s in steps:
        if s.t in marks:
            print(f"| {s.t} | {s.seconds:.2f} | {s.peak_rss / 2**20:.0f} | {s.state_bytes / MB:.2f} | {s.store_bytes / MB:.1f} |")
    first, last = steps[min(1, len(steps) - 1)], steps[-1]
    print(f"\nstep(t={last.t}) / step(t={first.t}) = {last.seconds / first.seconds:.2f}; state(t={last.t}) / state(t={first.t}) = "
          f"{last.state_bytes / first.state_bytes:.2f} (C is constant-size, one per input group; B and A·G̃ grow by r columns/rows per task, "
          "and the exported exact adapter has rank Σr = r·t).")


def print_7b(shape: Shape, steps: list[Step], baseline_rss: int, cpus: int, config: LPMConfig) -> None:
    full = 32 / shape.layers
    what = "LLaVA-1.5-7B LoRA shapes" if (shape.hidden, shape.intermediate) == (4096, 11008) else "smoke shapes"
    print(f"{what} (hidden {shape.hidden}, MLP {shape.intermediate}, r={shape.rank}, "
          f"q/k/v/o/gate/up/down), {shape.layers} of 32 decoder blocks measured, {len(steps)} task steps through the "
          f"real merge stage on a local Ray of {cpus} CPUs (input groups fanned out as 1-CPU Ray tasks), C stored "
          f"{config.state_dtype}; RSS of the whole process tree (driver + Ray + workers) with Ray idle before the "
          f"first step {baseline_rss / GiB:.2f} GiB.\n")
    print("| t | step (s) | peak RSS, tree (GiB) | above idle (GiB) | state blob (GB) | task inputs stored (GB) "
          "| step adds to store (GB) | step × 32/L (min) | state × 32/L (GB) | store per task × 32/L (GB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in steps:
        print(f"| {s.t} | {s.seconds:.1f} | {s.peak_rss / GiB:.2f} | {(s.peak_rss - baseline_rss) / GiB:.2f} "
              f"| {s.state_bytes / 1e9:.2f} | {s.task_bytes / 1e9:.2f} | {s.added_bytes / 1e9:.2f} "
              f"| {s.seconds * full / 60:.1f} | {s.state_bytes * full / 1e9:.1f} | {s.added_bytes * full / 1e9:.1f} |")
    full_shape = Shape(32, shape.hidden, shape.intermediate, shape.rank)
    print(f"\nGrams per task, float32, whole model: {full_shape.gram_bytes(shared=True) / 1e9:.1f} GB, stored once per "
          f"input group (q/k/v and gate/up sharing; {full_shape.gram_bytes(shared=False) / 1e9:.1f} GB if stored per "
          "module). The state keeps one C per input group and the thin B and A·G̃ per module (no R). Each input group "
          "is one Ray task (its Gram read lazily, its previous state file, absorb, export, write, free), pinned to the "
          f"node holding the stage's inputs; at most {cpus} run at once (each also reserves its working set, "
          "`tasks.merge.job_bytes`, of the node's Ray `memory` resource, so a node short of memory runs fewer), so the "
          f"peak above idle is about {cpus} groups' working sets (the 11008-input down_proj's is the largest) whatever "
          "the number of blocks. Time and stored bytes scale with the blocks (the ×32/L columns); the tree's RSS sums "
          "each process's resident pages, so libraries shared by the workers count once per worker.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes everywhere (seconds to a minute)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    parser.add_argument("--tasks", type=int, help="synthetic stream length (default 100, smoke 5)")
    parser.add_argument("--7b-layers", dest="layers_7b", type=int, default=2, help="decoder blocks of the 7B-shaped merge")
    parser.add_argument("--7b-tasks", dest="tasks_7b", type=int, default=2, help="task steps of the 7B-shaped merge")
    parser.add_argument("--7b-cpus", dest="cpus_7b", type=int, default=2, help="CPUs of the local Ray of the 7B-shaped merge")
    parser.add_argument("--7b-state-dtype", dest="state_dtype_7b", choices=("float64", "float32"), default="float64",
                        help="LPMConfig.state_dtype of the 7B-shaped merge (how C is stored)")
    parser.add_argument("--tiny-pipeline", action="store_true", help="incremental ratio on examples/tiny.yaml")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in PARTS for p in parts):
        parser.error(f"--parts {args.parts!r}: choose a comma-separated subset of {', '.join(PARTS)}")
    if not 1 <= args.layers_7b <= 32 or args.tasks_7b < 1 or args.cpus_7b < 1:
        parser.error("--7b-layers must lie in 1..32, --7b-tasks and --7b-cpus be ≥ 1")
    scratch = Path(tempfile.mkdtemp(prefix="many-perf-"))
    result: dict[str, Any] = {"smoke": args.smoke}
    try:
        if "ratios" in parts:
            rows, raw = ratios(args.smoke, args.tiny_pipeline, scratch)
            print("| goal | measured | goal | met |\n|---|---:|---|---|")
            for name, value, goal, met in rows:
                print(f"| {name} | {value:.3f} | {goal} | {'yes' if met else 'no'} |")
            print()
            result["ratios"] = raw
        if "stream" in parts:
            shape = Shape(1, 32, 64) if args.smoke else Shape(3, 128, 256)
            steps = run_stream(shape, args.tasks or (5 if args.smoke else 100), scratch, "stream")
            print_stream(shape, steps)
            print()
            result["stream"] = [s.__dict__ for s in steps]
        if "7b" in parts:
            shape = Shape(1, 64, 172) if args.smoke else Shape(args.layers_7b, 4096, 11008)
            config = LPMConfig(state_dtype=args.state_dtype_7b)
            steps, baseline = run_7b(shape, args.tasks_7b, args.cpus_7b, config, scratch)
            print_7b(shape, steps, baseline, args.cpus_7b, config)
            result["7b"] = {"layers": shape.layers, "cpus": args.cpus_7b, "state_dtype": config.state_dtype,
                            "idle_tree_rss": baseline, "steps": [s.__dict__ for s in steps]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
