"""Performance summary (issue #8): the earlier issues' cost goals as ratios in one run, a 100-task synthetic merge
stream, and a LLaVA-1.5-7B-shaped merge step — all through the real stages and store.

  ratios  runs benchmarks.incremental, merge_cost, train_overhead and store_overhead (their own code, their JSON)
          and prints each goal as measured / goal. `--tiny-pipeline` runs the incremental part on
          examples/tiny.yaml instead of the default mini-UCIT stream (minutes instead of ~an hour on 2 cores).
  stream  100 synthetic tasks (random LoRAs r=8 and SPD Grams, no training) at the default tiny model's LoRA
          shapes through the real `merge` stage (benchmarks.synthetic.merge_stream): time, state size and store
          size per step vs t, before (thin state, every state kept) and after (auto state: dense once smaller;
          `gc --keep-last 1` after each step); goals: step and state flat once switched, store growth linear.
  grams   the merge error of Grams stored bfloat16 / float16 (stats.gram_dtype) against float32, and their bytes.
  7b      synthetic tasks at LLaVA-1.5-7B shapes (hidden 4096, MLP 11008, r=8 on q/k/v/o/gate/up/down) through the
          same stage as the pipeline runs it: a 1-CPU Ray task on a local Ray of `--7b-cpus` CPUs, which fans the
          input groups (q/k/v, o, gate/up, down of each block) out as 1-CPU Ray tasks on its node. On `--7b-layers`
          of the 32 decoder blocks (default 2: peak memory is concurrent groups × one group, whatever the blocks;
          time and bytes scale with the blocks); per step: time, peak RSS of the whole process tree (the driver,
          Ray's processes and its workers), bytes stored, extrapolated linearly to 32 blocks.
  7b-cluster  one merge step at those shapes, all 32 blocks, fanned out over a simulated 3-node Ray cluster
          (benchmarks.cluster7b): peak memory per node against its Ray `memory` resource, wall time, bytes.

    python -m benchmarks.perf [--smoke] [--parts ratios,stream,grams,7b,7b-cluster] [--tasks N] [--7b-layers L]
                              [--7b-tasks T] [--7b-cpus N] [--7b-state-dtype float64|float32] [--7b-cluster-cpus N]
                              [--7b-cluster-blocks L] [--7b-cluster-node-gib G] [--tiny-pipeline] [--json PATH]
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

from benchmarks.synthetic import ALL_TOKENS, Shape, Step, merge_stream, rss
from many.config import LPMConfig

PARTS = ("ratios", "stream", "grams", "7b", "7b-cluster")
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


def run_stream(shape: Shape, tasks: int, scratch: Path, label: str, config: LPMConfig = ALL_TOKENS,
               on_ray: bool = False, collect: bool = False) -> list[Step]:
    from tasks.store import Store

    root = scratch / f"store-{label}"
    store = Store.open(str(root), cache_dir=scratch / f"cache-{label}")

    def progress(step: Step) -> None:
        print(f"  {label}: t={step.t} {step.seconds:.1f} s, peak RSS {step.peak_rss / GiB:.2f} GiB", file=sys.stderr, flush=True)

    try:
        return merge_stream(store, root, shape, tasks, scratch / f"inputs-{label}", config, progress, on_ray, collect)[0]
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


def switch_step(shape: Shape) -> int:
    """The first t at which every layer's state is dense (Σr·(in + out) ≥ in·out, r per task)."""
    return max(-(-(n_in * n_out) // ((n_in + n_out) * shape.rank)) for n_out, n_in, _ in shape.modules().values())


def stream_goals(shape: Shape, before: list[Step], after: list[Step]) -> list[tuple[str, float, str, bool]]:
    """Print the 100-task stream before (thin state, every state kept) and after (auto state, `gc --keep-last 1`
    after each step); return the goal rows: step and state flat once switched, store growth linear in t."""
    marks = {1, 2, 5, 10, 20, 50, len(after)}
    switched = switch_step(shape)
    print(f"{len(after)} synthetic tasks at {shape.layers} blocks × 7 LoRA layers (hidden {shape.hidden}, MLP "
          f"{shape.intermediate}, r={shape.rank}) through the real merge stage into a local store. Before: the state "
          "kept as thin factors (lpm.state_form thin, the earlier format) and every superseded state kept; after: "
          "lpm.state_form auto (every layer dense from t = "
          f"{switched}) and `gc --keep-last 1` after each step (superseded states collected). Peak RSS of the whole "
          "process during the step.\n")
    print("| t | step before (s) | step after (s) | step CPU before (s) | step CPU after (s) | state before (MB) "
          "| state after (MB) | store before (MB) | store after gc (MB) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, a in zip(before, after):
        if a.t in marks or a.t == switched:
            print(f"| {a.t} | {b.seconds:.2f} | {a.seconds:.2f} | {b.cpu_seconds:.2f} | {a.cpu_seconds:.2f} "
                  f"| {b.state_bytes / MB:.2f} | {a.state_bytes / MB:.2f} | {b.store_bytes / MB:.1f} "
                  f"| {a.store_bytes / MB:.1f} |")
    last = after[-1]
    if last.t < switched + 4:
        print(f"\n(stream shorter than the switch at t = {switched} + 4: no flatness goals)")
        return []
    first = after[switched]  # the first step whose previous state is already dense everywhere
    # CPU time of the step (the stage runs in this process): wall time on the shared box swings with others' load
    window = range(switched, min(switched + 5, last.t))
    median_first = sorted(after[i].cpu_seconds for i in window)[len(window) // 2]
    median_last = sorted(s.cpu_seconds for s in after[-5:])[2]
    step_ratio = median_last / median_first

    def growth(steps: list[Step]) -> float:  # bytes added per task over the last fifth / over the fifth after switching
        span = max(2, (len(steps) - switched) // 5)
        early = (steps[switched + span].store_bytes - steps[switched].store_bytes) / span
        late = (steps[-1].store_bytes - steps[-1 - span].store_bytes) / span
        return late / early

    rows = [
        (f"stream: step CPU t={last.t} / step CPU t={first.t} after the switch (medians of 5)", step_ratio, "≤ 1.2",
         step_ratio <= 1.2),
        (f"stream: state t={last.t} / state t={switched} (after)", last.state_bytes / after[switched - 1].state_bytes,
         "≤ 1.0", last.state_bytes <= after[switched - 1].state_bytes),
        (f"stream: store added per task, last fifth / first fifth after t={switched}, after (gc)", growth(after),
         "≤ 1.1", growth(after) <= 1.1),
        ("stream: the same, before (thin, all states kept)", growth(before), "≤ 1.1 (not a goal of the old format)",
         growth(before) <= 1.1),
        (f"stream: store t={last.t}, after / before", last.store_bytes / before[-1].store_bytes, "< 1",
         last.store_bytes < before[-1].store_bytes),
    ]
    print(f"\nstore(t={last.t}): before {before[-1].store_bytes / MB:.0f} MB, after {last.store_bytes / MB:.0f} MB; "
          f"state(t={last.t}) before {before[-1].state_bytes / MB:.2f} MB, after {last.state_bytes / MB:.2f} MB.")
    return rows


def gram_dtype_errors(shape: Shape, tasks: int) -> list[tuple[str, float, str, bool]]:
    """LPM merges of the same synthetic tasks with their Grams stored float32, bfloat16 and float16 (StatsConfig.
    gram_dtype): per dtype the file size and the merged update's worst relative error over the layers against the
    float32 Grams' merge."""
    import torch

    from benchmarks.synthetic import write_task
    from many.adapters import lora_factors
    from many.lpm import absorb_model, export_lora
    from many.stats import load_grams, save_grams

    scratch = Path(tempfile.mkdtemp(prefix="many-grams-"))
    try:
        merged, sizes = {}, {}
        for dtype in ("float32", "bfloat16", "float16"):
            states, size = None, 0
            for seed in range(1, tasks + 1):
                task_dir, gram_path = write_task(shape, seed, scratch)
                grams = load_grams(gram_path)
                if dtype != "float32":
                    gram_path = save_grams(grams, scratch / f"{dtype}-{seed}.safetensors", dtype)
                    grams = load_grams(gram_path)
                size += gram_path.stat().st_size
                states = absorb_model(states, lora_factors(task_dir / "adapter"), grams, LPMConfig())
            merged[dtype] = {name: torch.mm(*export_lora(state, name)) for name, state in states.items()}
            sizes[dtype] = size
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Grams stored in half precision (stats.gram_dtype): {tasks} synthetic tasks at {shape.layers} block(s) "
          f"(hidden {shape.hidden}, MLP {shape.intermediate}, r={shape.rank}; Grams XᵀX/N of 256 random tokens + "
          "0.01·I), merged by LPM (default γ); error = ‖M − M_float32‖_F / ‖M_float32‖_F of the merged update, worst "
          "layer.\n")
    print("| Grams | bytes / float32 | merge error (worst layer) | merge error (mean) |\n|---|---:|---:|---:|")
    rows = []
    for dtype in ("bfloat16", "float16"):
        errors = [(torch.linalg.matrix_norm(merged[dtype][n] - M) / torch.linalg.matrix_norm(M)).item()
                  for n, M in merged["float32"].items()]
        ratio = sizes[dtype] / sizes["float32"]
        print(f"| {dtype} | {ratio:.3f} | {max(errors):.2e} | {sum(errors) / len(errors):.2e} |")
        rows.append((f"Grams {dtype}: bytes / float32 (header included)", ratio, "≤ 0.51", ratio <= 0.51))
        rows.append((f"Grams {dtype}: merge error, worst layer", max(errors), "≤ 1e-2", max(errors) <= 1e-2))
    print()
    return rows


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
    parser.add_argument("--parts", default="ratios,7b",
                        help="comma-separated subset of " + ", ".join(PARTS) + " (default: ratios,7b — issue "
                             "#17's stream, grams and 7b-cluster run in benchmarks.merge_bounds)")
    parser.add_argument("--tasks", type=int, help="synthetic stream length (default 100, smoke 5)")
    parser.add_argument("--7b-layers", dest="layers_7b", type=int, default=2, help="decoder blocks of the 7B-shaped merge")
    parser.add_argument("--7b-tasks", dest="tasks_7b", type=int, default=2, help="task steps of the 7B-shaped merge")
    parser.add_argument("--7b-cpus", dest="cpus_7b", type=int, default=2, help="CPUs of the local Ray of the 7B-shaped merge")
    parser.add_argument("--7b-state-dtype", dest="state_dtype_7b", choices=("float64", "float32"), default="float64",
                        help="LPMConfig.state_dtype of the 7B-shaped merge (how C is stored)")
    parser.add_argument("--7b-cluster-cpus", dest="cluster_cpus", type=int, default=2,
                        help="CPUs of each of the 3 simulated nodes of the 7b-cluster part")
    parser.add_argument("--7b-cluster-blocks", dest="cluster_blocks", type=int, default=32,
                        help="decoder blocks of the 7b-cluster part (default all 32; bytes and job time scale with them)")
    parser.add_argument("--7b-cluster-node-gib", dest="cluster_gib", type=float, default=4.0,
                        help="Ray `memory` resource of each node of the 7b-cluster part (GiB)")
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
    goals: list[tuple[str, float, str, bool]] = []  # issue #17's goals, printed together at the end
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
            count = args.tasks or (12 if args.smoke else 100)
            before = run_stream(shape, count, scratch, "before", ALL_TOKENS.model_copy(update={"state_form": "thin"}))
            after = run_stream(shape, count, scratch, "after", collect=True)
            goals += stream_goals(shape, before, after)
            print()
            result["stream"] = {"before": [s.__dict__ for s in before], "after": [s.__dict__ for s in after]}
        if "grams" in parts:
            goals += gram_dtype_errors(Shape(1, 32, 64) if args.smoke else Shape(1, 1024, 2752), 2 if args.smoke else 5)
        if "7b" in parts:
            shape = Shape(1, 64, 172) if args.smoke else Shape(args.layers_7b, 4096, 11008)
            config = ALL_TOKENS.model_copy(update={"state_dtype": args.state_dtype_7b})
            steps, baseline = run_7b(shape, args.tasks_7b, args.cpus_7b, config, scratch)
            print_7b(shape, steps, baseline, args.cpus_7b, config)
            result["7b"] = {"layers": shape.layers, "cpus": args.cpus_7b, "state_dtype": config.state_dtype,
                            "idle_tree_rss": baseline, "steps": [s.__dict__ for s in steps]}
        if "7b-cluster" in parts:
            from benchmarks.cluster7b import main_part

            rows, raw = main_part(args.smoke, args.cluster_cpus, args.cluster_gib, args.state_dtype_7b, args.cluster_blocks)
            goals += rows
            result["7b_cluster"] = raw
        if goals:
            print("Goals of issue #17 (merge state bounded by the dense form, store growth, 7B on a cluster):\n")
            print("| goal | measured | goal | met |\n|---|---:|---|---|")
            for name, value, goal, met in goals:
                print(f"| {name} | {value:.3g} | {goal} | {'yes' if met else 'no'} |")
            print()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
