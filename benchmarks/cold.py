"""Cold default run (issue #17): `many run` into an empty store, as a user types it, with where its time went.

    python -m benchmarks.cold                 the embedded mini-UCIT default (6 tasks, every default method)
    python -m benchmarks.cold --smoke         examples/tiny.yaml (seconds per stage)
    python -m benchmarks.cold --analyse URL   only the analysis, of the latest run in an existing store

The run is one `many run --json` command with no Prefect API configured, so its own local Prefect server start
counts, as it does for a user. From the run's stage manifests (their `seconds`, `created`, `host` and inputs: what
the report's stage timeline reads) it prints the compute seconds per stage kind, the critical path — from the stage
that ended last, back through the input that became ready last, each step's compute and wait — and the floor a
scheduler could reach on this machine: max(the longest dependency chain's compute seconds, all compute seconds /
cores).
Goals: cold wall ≤ 12 min on 2 cores, and ≤ 1.3 × the floor.

Levers, measured side by side in the same run: one caption task's scoring with the process's shared METEOR JVM
(many.meteor) against a fresh JVM per call (how it was), over the same predictions. The stage order (critical path
first, tasks/gate.py) is measured with `--compare-order`: the same cold run twice, `ray.critical_path_first` off
then on, into two stores (twice the time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import EXAMPLES, many_cli, quiet_environment, timed

ROOT = Path(__file__).resolve().parents[1]
GOAL_WALL_S = 12 * 60.0
GOAL_FLOOR_RATIO = 1.3


def cold_run(config: Path | None, store: Path, env: dict[str, str]) -> tuple[dict, float, float]:
    """`many run --json` into `store` as a command (no Prefect API configured: it starts its own server, as for a
    user): (summary, wall seconds, CPU seconds of it and the processes it waited for)."""
    return many_cli(["run", "--store", str(store), *(["--config", str(config)] if config else [])], env)


def analyse(store_url: str, summary: dict[str, Any], cores: int) -> dict[str, Any]:
    """Per-kind compute seconds, the critical path and the floor of the stages `summary` computed, from their
    manifests (compute seconds; end = `created`, start = end − seconds)."""
    from tasks.store import Store

    store = Store.open(store_url, create=False)
    stages = []
    for entry in summary["stages"]:
        if entry["status"] != "computed":
            continue
        manifest = store.read_manifest(entry["stage"], entry["key"])
        end = datetime.fromisoformat(manifest.created).timestamp()
        stages.append({"label": label(entry), "kind": entry["stage"], "seconds": manifest.seconds, "host": manifest.host,
                       "start": end - manifest.seconds, "end": end,
                       "inputs": {ref.digest for ref in manifest.inputs.values()},
                       "outputs": {ref.digest for ref in manifest.outputs.values()}})
    if not stages:
        raise SystemExit("the run computed no stage: analyse a cold run")
    producer = {digest: s for s in stages for digest in s["outputs"]}
    origin = min(s["start"] for s in stages)
    kinds: dict[str, list[float]] = {}
    for s in stages:
        kinds.setdefault(s["kind"], []).append(s["seconds"])
    path, node = [], max(stages, key=lambda s: s["end"])
    while node is not None:
        upstream = [producer[d] for d in node["inputs"] if d in producer]
        ready = max((u["end"] for u in upstream), default=origin)
        path.append({"stage": node["label"], "start": node["start"] - origin, "seconds": node["seconds"],
                     "waited": max(0.0, node["start"] - ready)})
        node = max(upstream, key=lambda u: u["end"]) if upstream else None
    path.reverse()
    total = sum(s["seconds"] for s in stages)
    # the longest chain of dependencies by compute seconds alone: what no scheduler can beat (a stage starts after
    # its inputs end, so end order is a topological order)
    longest: dict[int, tuple[float, list[str]]] = {}
    for s in sorted(stages, key=lambda s: s["end"]):
        upstream = [longest[id(producer[d])] for d in s["inputs"] if d in producer and id(producer[d]) in longest]
        before = max(upstream, key=lambda u: u[0], default=(0.0, []))
        longest[id(s)] = (before[0] + s["seconds"], [*before[1], s["label"]])
    critical, chain = max(longest.values(), key=lambda c: c[0])
    return {
        "stages": len(stages), "compute_seconds": total, "span_seconds": max(s["end"] for s in stages) - origin,
        "kinds": {k: {"n": len(v), "sum": sum(v), "min": min(v), "max": max(v)} for k, v in sorted(kinds.items())},
        "critical_path": path, "critical_seconds": critical, "longest_chain": chain, "cores": cores,
        "floor_seconds": max(critical, total / cores),
    }


def label(entry: dict[str, Any]) -> str:
    return entry["stage"] + (f"[{entry['task']}]" if entry.get("task") else "") + (f"[{entry['method']}]" if entry.get("method") else "")


def meteor_lever(tasks: int, samples: int) -> dict[str, float]:
    """Seconds to score `tasks` caption tasks of `samples` predictions each: with the process's shared METEOR JVM
    (as now) and with a fresh JVM per task (as before), alternating, same predictions; the scores must agree."""
    from many import meteor
    from many.data import MiniUcitConfig
    from many.data.mini_ucit.stream import make_task
    from many.metrics import caption_scores

    data = make_task("noisy-caption", MiniUcitConfig(n_train=1, n_test=samples))
    references = [s.answer for s in data.test]
    predictions = [r.rsplit(" ", 1)[0] for r in references]  # a plausible caption missing its last word
    shared, fresh, results = [], [], set()
    meteor.stop()
    caption_scores(predictions, references)  # the shared JVM's one start, paid once per worker process
    for _ in range(tasks):
        scores, seconds = timed(lambda: caption_scores(predictions, references))
        shared.append(seconds)
        results.add(scores["METEOR"])
        meteor.stop()
        scores, seconds = timed(lambda: caption_scores(predictions, references))  # starts a JVM: the old cost
        fresh.append(seconds)
        results.add(scores["METEOR"])  # the JVM started here is the shared one of the next round
    meteor.stop()
    assert len(results) == 1, f"shared and fresh METEOR disagree: {results}"
    return {"tasks": tasks, "samples": samples, "shared_s": statistics.median(shared),
            "fresh_s": statistics.median(fresh), "ratio": statistics.median(shared) / statistics.median(fresh)}


def print_report(run: dict[str, Any], analysis: dict[str, Any], lever: dict[str, float] | None,
                 order: dict[str, float] | None, smoke: bool) -> None:
    a = analysis
    if run:
        print(f"Stream: {run['stream']}; `many run` wall {run['wall_s']:.0f} s ({run['wall_s'] / 60:.1f} min), CPU "
              f"{run['cpu_s']:.0f} s, {a['stages']} stages computed on {a['cores']} cores.\n")
    print("| stage kind | stages | compute s | min s | max s |\n|---|---:|---:|---:|---:|")
    for kind, k in a["kinds"].items():
        print(f"| {kind} | {k['n']} | {k['sum']:.1f} | {k['min']:.1f} | {k['max']:.1f} |")
    print(f"| **all** | {a['stages']} | {a['compute_seconds']:.1f} | | |\n")
    print("Critical path as run (from the stage that ended last, back through the input ready last):\n")
    print("| stage | started at s | compute s | waited for a core s |\n|---|---:|---:|---:|")
    for p in a["critical_path"]:
        print(f"| {p['stage']} | {p['start']:.0f} | {p['seconds']:.1f} | {p['waited']:.1f} |")
    print(f"\nLongest dependency chain by compute seconds: {' → '.join(a['longest_chain'])}.\n")
    print(f"Floor = max(that chain {a['critical_seconds']:.0f} s, compute {a['compute_seconds']:.0f} s / "
          f"{a['cores']} cores = {a['compute_seconds'] / a['cores']:.0f} s) = {a['floor_seconds']:.0f} s; stages spanned "
          f"{a['span_seconds']:.0f} s.\n")
    if lever:
        print(f"Lever, shared METEOR JVM: scoring one caption task of {lever['samples']} answers takes "
              f"{lever['shared_s']:.2f} s with the worker's JVM against {lever['fresh_s']:.2f} s starting one "
              f"(median of {lever['tasks']}, alternating; same scores): {lever['ratio']:.3f}×.\n")
    if order:
        print(f"Lever, critical path first: cold wall {order['on_s']:.0f} s with it, {order['off_s']:.0f} s without "
              f"(same stream, one after the other): {order['on_s'] / order['off_s']:.3f}×.\n")
    rows = []
    if run:
        full = "" if not smoke else " (goal is for the default stream; smoke: not judged)"
        rows.append(("cold `many run` wall", f"{run['wall_s']:.0f} s", f"≤ {GOAL_WALL_S:.0f} s on 2 cores",
                     None if smoke else run["wall_s"] <= GOAL_WALL_S, full))
        ratio = run["wall_s"] / a["floor_seconds"]
        rows.append(("cold wall / floor", f"{ratio:.2f}", f"≤ {GOAL_FLOOR_RATIO}", None if smoke else ratio <= GOAL_FLOOR_RATIO, full))
    print("| goal | measured | target | met |\n|---|---|---|---|")
    for name, value, target, met, note in rows:
        print(f"| {name} | {value} | {target} | {'n/a' if met is None else 'met' if met else 'missed'}{note} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="examples/tiny.yaml; a short METEOR lever")
    parser.add_argument("--store", type=Path, help="the empty store to run into (default: a temporary one)")
    parser.add_argument("--analyse", metavar="URL", help="only analyse the latest run of this store")
    parser.add_argument("--compare-order", action="store_true", help="also a cold run with ray.critical_path_first off")
    parser.add_argument("--no-lever", action="store_true", help="skip the METEOR lever")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="many-bench-cold-"))
    quiet_environment(scratch)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    config = EXAMPLES / "tiny.yaml" if args.smoke else None
    from flows.config import load_config

    cores = load_config(config).ray.num_cpus or os.cpu_count() or 1
    run: dict[str, Any] = {}
    order = None
    if args.analyse:
        from tasks.store import Store

        store_url = args.analyse
        summary = Store.open(store_url, create=False).read_run("latest")
    else:
        store = args.store or scratch / "store"
        if store.exists() and any(store.iterdir()):
            parser.error(f"--store {store} is not empty: a cold run needs an empty store")
        print(f"  cold run into {store} …", file=sys.stderr, flush=True)
        summary, wall, cpu = cold_run(config, store, env)
        store_url = str(store)
        run = {"stream": "examples/tiny.yaml" if args.smoke else "embedded mini-UCIT default", "wall_s": wall, "cpu_s": cpu}
        if args.compare_order:
            off = scratch / "order-off.yaml"
            base = yaml.safe_load(config.read_text()) if config else {}
            off.write_text(yaml.safe_dump({**base, "ray": {**base.get("ray", {}), "critical_path_first": False}}))
            print("  cold run without critical path first …", file=sys.stderr, flush=True)
            _, off_wall, _ = cold_run(off, scratch / "store-order-off", env)
            order = {"on_s": wall, "off_s": off_wall}
    analysis = analyse(store_url, summary, cores)
    lever = None if args.no_lever else meteor_lever(2 if args.smoke else 5, 20 if args.smoke else 200)
    print_report(run, analysis, lever, order, args.smoke)
    if args.json:
        args.json.write_text(json.dumps({"run": run, "analysis": analysis, "meteor": lever, "order": order,
                                         "goals": {"wall_s": GOAL_WALL_S, "floor_ratio": GOAL_FLOOR_RATIO}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
