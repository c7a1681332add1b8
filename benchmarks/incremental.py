"""Incremental cost of the cached pipeline (docs/design.md §2 "Cache key", §4 "Cache first"): what adding one task
and rerunning cost against a cold run, each one `many run` command as a user types it (a fresh process: its imports
count), one after the other, on fresh stores.

    cold(T+1)      the stream's first T+1 tasks into an empty store (the denominator)
    cold(T)        the first T tasks into a second empty store
    add(T→T+1)     the same store, one more task: only that task's stages, merges and eval row compute
    cached(T+1)    the same store again: nothing computes; decided before Prefect, Ray or torch load

Goals: add / cold(T+1) ≤ 1.5 / (T+1), cached / cold(T+1) ≤ 0.05, and the cached rerun's fixed cost — the CPU
seconds of its whole process — ≤ 3 s. One Prefect server is started first and every command uses it
(PREFECT_API_URL), so no measurement pays for a server start; Ray starts (and stops) inside every run that
computes, as in real use. Wall seconds are what the ratios use; CPU seconds (user + system of the command and the
processes it waited for, `getrusage(RUSAGE_CHILDREN)`) are shown beside them. Default: the embedded mini-UCIT stream with T = 3;
`--smoke`: examples/tiny.yaml with T = 2 (seconds per stage, so fixed costs weigh most there).

    python -m benchmarks.incremental [--smoke] [--tasks T] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import EXAMPLES, many_cli, quiet_environment

ROOT = Path(__file__).resolve().parents[1]
FIXED_COST_GOAL_S = 3.0


def start_prefect() -> object:
    """One local Prefect server for every command of the benchmark (flows.supervise's, without a scheduler)."""
    from flows.supervise import LocalPrefectServer, api_answers

    server = LocalPrefectServer(scheduler=False)
    deadline = time.monotonic() + 180
    while not api_answers(server.api_url, timeout=2.0):
        if server.failure() or time.monotonic() > deadline:
            raise RuntimeError(f"the benchmark's Prefect server did not start: {server.failure() or 'timeout'}")
        time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server


def many_run(config: str | None, store: Path, tasks: int) -> tuple[dict, float, float]:
    """`many run --json` as a command: (summary, wall seconds, CPU seconds of it and its children)."""
    args = ["run", "--store", str(store), "--tasks", str(tasks), *(["--config", config] if config else [])]
    return many_cli(args, {**os.environ, "PYTHONPATH": str(ROOT)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="examples/tiny.yaml, T = 2")
    parser.add_argument("--tasks", type=int, help="T: tasks of the cold run (default 3, smoke 2)")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="many-bench-"))
    quiet_environment(scratch)
    from flows.config import load_config

    config_path = str(EXAMPLES / "tiny.yaml") if args.smoke else None
    config = load_config(config_path)
    T = args.tasks or (2 if args.smoke else 3)
    if not 1 <= T < len(config.tasks):
        parser.error(f"--tasks must lie in 1..{len(config.tasks) - 1} for this stream")

    server = start_prefect()
    try:
        def timed_run(store: str, tasks: int) -> tuple[dict, float, float]:
            print(f"  {tasks} tasks into {store} …", file=sys.stderr, flush=True)
            return many_run(config_path, scratch / store, tasks)

        _, cold_next, cold_next_cpu = timed_run("store-a", T + 1)
        _, cold, cold_cpu = timed_run("store-b", T)
        added, add, add_cpu = timed_run("store-b", T + 1)
        rerun, cached, cached_cpu = timed_run("store-b", T + 1)
    finally:
        server.stop()

    def computed(summary: dict) -> int:
        return sum(s["status"] == "computed" for s in summary["stages"])

    goals = {
        "add/cold(T+1)": (add / cold_next, 1.5 / (T + 1), "{:.3f}"),
        "cached/cold(T+1)": (cached / cold_next, 0.05, "{:.3f}"),
        "cached rerun fixed cost (CPU s)": (cached_cpu, FIXED_COST_GOAL_S, "{:.2f}"),
    }
    rows = [
        ("cold(T+1)", T + 1, None, cold_next, cold_next_cpu),
        ("cold(T)", T, None, cold, cold_cpu),
        ("add(T→T+1)", T + 1, computed(added), add, add_cpu),
        ("cached(T+1)", T + 1, computed(rerun), cached, cached_cpu),
    ]
    stream = "examples/tiny.yaml" if args.smoke else "embedded mini-UCIT default"
    print(f"Stream: {stream}, T = {T}, methods: {', '.join(config.methods)}; each run one `many run` command (imports "
          f"included), one warm Prefect server; Ray started on the cached rerun: {rerun['ray_started']}.\n")
    print("| run | tasks | stages computed | wall s | CPU s |\n|---|---|---|---|---|")
    for name, tasks, n, seconds, cpu in rows:
        print(f"| {name} | {tasks} | {'all' if n is None else n} | {seconds:.1f} | {cpu:.1f} |")
    print("\n| goal | measured | target | met |\n|---|---|---|---|")
    for name, (value, goal, fmt) in goals.items():
        print(f"| {name} | {fmt.format(value)} | ≤ {fmt.format(goal)} | {'met' if value <= goal else 'missed'} |")
    if args.json:
        args.json.write_text(json.dumps({
            "stream": stream, "T": T, "seconds": {name: s for name, _, _, s, _ in rows},
            "cpu_seconds": {name: c for name, _, _, _, c in rows},
            "computed": {"add": computed(added), "cached": computed(rerun)},
            "goals": {name: {"value": v, "goal": g} for name, (v, g, _) in goals.items()},
            "ray_started_on_cached": rerun["ray_started"],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
