"""Issue #17's goals in one table: a fast cold run, a cheap store, a free cached rerun, the GPU check. Each row comes
from the benchmark that measures it, run here (their own code, their JSON):

    1  benchmarks.cold              cold `many run` wall ≤ 12 min on 2 cores, and ≤ 1.3 × the floor
    4  benchmarks.store_overhead    store put + materialize ≤ 1.2 × a plain fsspec copy (local and S3)
    5  benchmarks.incremental       cached rerun ≤ 3 CPU s; add/cold ≤ 1.5/(T+1) and cached/cold ≤ 0.05
    7  benchmarks.gpu               many's 7B-shaped bf16 LoRA step ≥ 0.9 × a bare PEFT loop (only where CUDA is)

    python -m benchmarks.issue17 [--smoke] [--cold-smoke] [--cold-json PATH]

`--cold-smoke` runs the cold part on examples/tiny.yaml (its time goals are then not judged: they are for the default
stream on an idle 2-core machine); `--cold-json` reads a finished `python -m benchmarks.cold --json PATH` instead of
running one. The cold run's detail (stage kinds, critical path, levers) follows the table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_benchmark(module: str, argv: list[str], scratch: Path) -> tuple[dict[str, Any], str]:
    """`module`.main(argv + --json): its JSON and what it printed."""
    out = scratch / f"{module.rsplit('.', 1)[-1]}.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        importlib.import_module(module).main([*argv, "--json", str(out)])
    return json.loads(out.read_text()), printed.getvalue()


def verdict(value: float, goal: float, judged: bool = True, at_least: bool = False) -> str:
    if not judged:
        return "not judged (smoke stream)"
    return "met" if (value >= goal if at_least else value <= goal) else "missed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every part at its smoke size")
    parser.add_argument("--cold-smoke", action="store_true", help="the cold part on examples/tiny.yaml")
    parser.add_argument("--cold-json", type=Path, help="a finished benchmarks.cold --json result to report")
    parser.add_argument("--json", type=Path, help="also write every part's JSON here")
    args = parser.parse_args(argv)
    import torch

    scratch = Path(tempfile.mkdtemp(prefix="many-bench-17-"))
    smoke = ["--smoke"] if args.smoke else []
    cold_smoke = args.smoke or args.cold_smoke
    if args.cold_json:
        cold, cold_text = json.loads(args.cold_json.read_text()), f"(from {args.cold_json})\n"
    else:
        print("  issue17: cold …", file=sys.stderr, flush=True)
        cold, cold_text = run_benchmark("benchmarks.cold", ["--smoke"] if cold_smoke else [], scratch)
    print("  issue17: store_overhead …", file=sys.stderr, flush=True)
    store, _ = run_benchmark("benchmarks.store_overhead", smoke, scratch)
    print("  issue17: incremental …", file=sys.stderr, flush=True)
    incremental, _ = run_benchmark("benchmarks.incremental", ["--smoke"], scratch)  # tiny.yaml: the stream
    gpu = None
    if torch.cuda.is_available():
        print("  issue17: gpu …", file=sys.stderr, flush=True)
        gpu, _ = run_benchmark("benchmarks.gpu", smoke, scratch)

    rows = []
    run, analysis = cold["run"], cold["analysis"]
    judged = bool(run) and "default" in run.get("stream", "")
    if run:
        rows.append(("1", f"cold `many run` wall ({run['stream']})", f"{run['wall_s']:.0f} s",
                     f"≤ {cold['goals']['wall_s']:.0f} s", verdict(run["wall_s"], cold["goals"]["wall_s"], judged)))
        ratio = run["wall_s"] / analysis["floor_seconds"]
        rows.append(("1", f"cold wall / floor ({analysis['floor_seconds']:.0f} s on {analysis['cores']} cores)",
                     f"{ratio:.2f}", f"≤ {cold['goals']['floor_ratio']}", verdict(ratio, cold["goals"]["floor_ratio"], judged)))
    if cold.get("meteor"):
        m = cold["meteor"]
        rows.append(("1", f"lever: caption task scored with the shared METEOR JVM / a fresh one ({m['samples']} answers)",
                     f"{m['ratio']:.3f} ({m['shared_s']:.2f} s / {m['fresh_s']:.2f} s)", "lever", "—"))
    for row in store["rows"]:
        rows.append(("4", f"store put + materialize / plain fsspec copy ({row['backend']}, "
                     f"{store['file_bytes'] / 2**20:.0f} MB)", f"{row['ratio']:.2f}", f"≤ {store['goal']}",
                     verdict(row["ratio"], store["goal"])))
    names = {"cached rerun fixed cost (CPU s)": "cached rerun: CPU seconds of the whole `many run`"}
    for name, goal in incremental["goals"].items():
        rows.append(("5", f"{names.get(name, name)} ({incremental['stream']}, T={incremental['T']})",
                     f"{goal['value']:.3f}", f"≤ {goal['goal']:.3f}", verdict(goal["value"], goal["goal"])))
    if gpu:
        step = gpu["lora_step"]
        rows.append(("7", f"7B-shaped {step['dtype']} LoRA step: many / bare PEFT steps/s ({gpu['device']})",
                     f"{step['ratio']:.3f}", f"≥ {step['goal_ratio']}",
                     verdict(step["ratio"], step["goal_ratio"], judged=not args.smoke, at_least=True)))
        if gpu["pipeline"]:
            rows.append(("7", "tiny pipeline on CUDA: cold wall", f"{gpu['pipeline']['wall_s']:.0f} s", "runs", "met"))
    else:
        rows.append(("7", "7B-shaped bf16 LoRA step: many / bare PEFT steps/s", "not measured: no CUDA here",
                     "≥ 0.9", "not measured"))
    print("| # | goal | measured | target | met |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n### Cold run detail (`python -m benchmarks.cold{' --smoke' if cold_smoke and not args.cold_json else ''}`)\n")
    print(cold_text.strip())
    if args.json:
        args.json.write_text(json.dumps({"cold": cold, "store": store, "incremental": incremental, "gpu": gpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
