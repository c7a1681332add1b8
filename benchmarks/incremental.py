"""Incremental cost of the cached pipeline (docs/design.md §2 "Cache key"): what adding one task and rerunning
cost against a cold run, measured in one process, one after the other, on fresh stores.

    cold(T+1)      the stream's first T+1 tasks into an empty store (the denominator)
    cold(T)        the first T tasks into a second empty store
    add(T→T+1)     the same store, one more task: only that task's stages, merges and eval row compute
    cached(T+1)    the same store again: nothing computes, Ray is not started

Goals: add / cold(T+1) ≤ 1.5 / (T+1)  and  cached / cold(T+1) ≤ 0.05. The Prefect server is started by a
warm-up flow first so no measurement pays for it; Ray starts (and is shut down) inside every run that
computes, as in real use. Default: the embedded mini-UCIT stream with T = 3; `--smoke`: examples/tiny.yaml
with T = 2 (seconds per stage; its fixed Prefect/Ray costs dominate, so the goals are for the full run).

    python -m benchmarks.incremental [--smoke] [--tasks T] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import quiet_environment, stream_config, timed, warm_up_prefect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="examples/tiny.yaml, T = 2")
    parser.add_argument("--tasks", type=int, help="T: tasks of the cold run (default 3, smoke 2)")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="many-bench-"))
    quiet_environment(scratch)

    from flows.pipeline import continual_update

    config = stream_config(args.smoke)
    T = args.tasks or (2 if args.smoke else 3)
    if not 1 <= T < len(config.tasks):
        parser.error(f"--tasks must lie in 1..{len(config.tasks) - 1} for this stream")

    warm_up_prefect()

    def timed_run(store: Path, tasks: int) -> tuple[float, dict]:
        cfg = config.model_copy(update={"store": config.store.model_copy(update={"url": str(store)})}).first(tasks)
        print(f"  {tasks} tasks into {store.name} …", file=sys.stderr, flush=True)
        summary, seconds = timed(lambda: continual_update(cfg))
        return seconds, summary

    cold_next, _ = timed_run(scratch / "store-a", T + 1)
    cold, _ = timed_run(scratch / "store-b", T)
    add, added = timed_run(scratch / "store-b", T + 1)
    cached, rerun = timed_run(scratch / "store-b", T + 1)

    def computed(summary: dict) -> int:
        return sum(s["status"] == "computed" for s in summary["stages"])

    ratios = {"add/cold(T+1)": (add / cold_next, 1.5 / (T + 1)), "cached/cold(T+1)": (cached / cold_next, 0.05)}
    rows = [
        ("cold(T+1)", T + 1, None, cold_next),
        ("cold(T)", T, None, cold),
        ("add(T→T+1)", T + 1, computed(added), add),
        ("cached(T+1)", T + 1, computed(rerun), cached),
    ]
    stream = "examples/tiny.yaml" if args.smoke else "embedded mini-UCIT default"
    print(f"Stream: {stream}, T = {T}, methods: {', '.join(config.methods)}; Ray started on the cached rerun: "
          f"{rerun['ray_started']}.\n")
    print("| run | tasks | stages computed | seconds |\n|---|---|---|---|")
    for name, tasks, n, seconds in rows:
        print(f"| {name} | {tasks} | {'all' if n is None else n} | {seconds:.1f} |")
    print("\n| ratio | measured | goal | met |\n|---|---|---|---|")
    for name, (value, goal) in ratios.items():
        print(f"| {name} | {value:.3f} | ≤ {goal:.3f} | {'yes' if value <= goal else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps({
            "stream": stream, "T": T, "seconds": {name: s for name, _, _, s in rows},
            "computed": {"add": computed(added), "cached": computed(rerun)},
            "ratios": {name: {"value": v, "goal": g} for name, (v, g) in ratios.items()},
            "ray_started_on_cached": rerun["ray_started"],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
