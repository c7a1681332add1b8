"""Cost of one LPM merge step against a bare float64 solve (docs/design.md §1).

A step absorbs task t into the RLS state of tasks 1..t−1 and solves for the merged update
(`many.lpm.absorb` + `many.lpm.solve`). Goals: the step should not grow with t — step(t=20) / step(t=2) ≤ 1.2
— and should cost little more than the linear solve that any closed-form merge needs — step /
`numpy.linalg.solve(C_t, R_t)` ≤ 1.5, on the same matrices, in the same run. C_t has a constant size, but the
state no longer stores R_t (it is AGᵀBᵀ): `solve` goes through the exact rank-Σr factors, B·(AG·C_t⁻¹), whose
triangular solves cost O(in²·Σr) on top of the O(in³) Cholesky — so the step grows with t once Σr = r·t is
no longer small against `in` (160 vs 1024 at t = 20 here; 160 vs 4096 at 7B). Each number is the median of several repeats; the task counts and the two solvers take turns, so that
they share the machine's noise.

Bounded by the dense RLS form (issue #17): a layer's state switches from the thin factors to the dense (C, R) once
Σr·(in + out) ≥ in·out (lpm.state_form "auto", the default). The second table times one merge step as the merge
stage runs it — absorb + export_lora — with the state kept "auto", always "thin" and always "dense" (the plain RLS
step: C += G̃, R += G̃ΔWᵀ, solve C⁻¹R), at t = 2 … 200, the forms taking turns, each the least thread CPU time of
its repeats (wall time on the shared box swings by 2× between identical calls).
Goals: auto ≤ dense at every t
(reported against ≤ 1.10: after the switch both run the same code, so the ratio is 1 up to timing noise), and the
state's numbers besides C ≤ min(thin, dense) at every t (exact counts).
On a shared or busy machine, multi-threaded timings are dominated by thread contention: run with
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 to give both libraries one core each.

    python -m benchmarks.merge_cost [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import timed
from many.config import LPMConfig
from many.lpm import LayerState, absorb, dense_is_smaller, export_lora, solve

STEP_GROWTH_GOAL = 1.2  # step(t=max) / step(t=min)
BARE_SOLVE_GOAL = 1.5  # step / bare solve
LAYER = "benchmark.layer"
FORMS_GOAL = 1.10  # auto step / dense RLS step, worst over t (1 after the switch, up to noise)
FORMS = ("auto", "thin", "dense")
SWITCH_PAUSE_S = 0.1  # lets a library's spinning worker threads go to sleep before the other library runs


def make_task(generator: torch.Generator, features: int, rank: int) -> tuple[Tensor, Tensor, float, Tensor]:
    """A float32 LoRA (non-zero B) and a float32 Gram XᵀX/N with N = 2·in, as the stats stage stores them."""
    samples = 2 * features
    inputs = torch.randn(samples, features, generator=generator)
    lora_B = torch.randn(features, rank, generator=generator)
    lora_A = torch.randn(rank, features, generator=generator) / features**0.5
    return lora_B, lora_A, 16.0 / rank, inputs.T @ inputs / samples


def measure(features: int, rank: int, task_counts: list[int], repeats: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    cfg = LPMConfig()
    # For each t: the state of tasks 1..t−1 and task t (the states of different t are all kept: a few MB each).
    points: dict[int, tuple[LayerState | None, tuple]] = {}
    state: LayerState | None = None
    for t in range(1, max(task_counts) + 1):
        task = make_task(generator, features, rank)
        if t in task_counts:
            points[t] = (state, task)
        state = absorb(state, *task, cfg, LAYER)
    times: dict[int, dict[str, list[float]]] = {t: {"absorb": [], "solve": [], "bare": []} for t in task_counts}
    # Rounds visit every t in turn, so that a burst of load on the machine hits all of them alike.
    for _ in range(repeats):
        for t, (previous, task) in points.items():
            # A pause and an untimed call of the same kind before each timed call, so that neither side pays
            # for the other library's idle worker threads (OpenBLAS's, OpenMP's) still spinning on the cores.
            time.sleep(SWITCH_PAUSE_S)
            solve(absorb(previous, *task, cfg, LAYER), LAYER)
            current, absorb_time = timed(lambda: absorb(previous, *task, cfg, LAYER))
            _, solve_time = timed(lambda: solve(current, LAYER))
            C, R = current.C.numpy(), current.rhs().numpy()
            time.sleep(SWITCH_PAUSE_S)
            np.linalg.solve(C, R)
            _, bare_time = timed(lambda: np.linalg.solve(C, R))
            times[t]["absorb"].append(absorb_time)
            times[t]["solve"].append(solve_time)
            times[t]["bare"].append(bare_time)
    rows = []
    for t, measured in times.items():
        step = statistics.median(a + s for a, s in zip(measured["absorb"], measured["solve"]))
        bare = statistics.median(measured["bare"])
        rows.append(
            {
                "tasks": t,
                "absorb_s": statistics.median(measured["absorb"]),
                "solve_s": statistics.median(measured["solve"]),
                "step_s": step,
                "bare_solve_s": bare,
                "step_over_bare": step / bare,
            }
        )
    return rows


def measure_forms(features: int, rank: int, task_counts: list[int], repeats: int, seed: int) -> list[dict]:
    """Per t: the least CPU time of `repeats` steps (absorb task t + export_lora, one torch thread) with the state
    kept in each of FORMS — CPU time of this thread and the minimum, not wall time and the median: the forms compare
    costs, and on a shared machine the other processes' load only ever adds wall time — and the numbers each state
    holds besides C after step t."""
    generator = torch.Generator().manual_seed(seed + 1)
    cfg = LPMConfig()
    points: dict[int, dict[str, tuple[LayerState | None, tuple]]] = {t: {} for t in task_counts}
    states: dict[str, LayerState | None] = dict.fromkeys(FORMS)
    after: dict[int, dict[str, int]] = {t: {} for t in task_counts}
    for t in range(1, max(task_counts) + 1):
        task = make_task(generator, features, rank)
        for form in FORMS:
            if t in points:
                points[t][form] = (states[form], task)
            states[form] = absorb(states[form], *task, cfg, LAYER, form)
            if t in after:
                after[t][form] = states[form].numbers
    times: dict[int, dict[str, list[float]]] = {t: {form: [] for form in FORMS} for t in task_counts}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread CPU time counts this thread's work only
    for _ in range(repeats):
        for t in task_counts:
            for form in FORMS:
                previous, task = points[t][form]

                def step() -> tuple:
                    return export_lora(absorb(previous, *task, cfg, LAYER, form), LAYER)

                step()  # untimed: warms the caches like the timed call after it
                start = time.thread_time()  # this thread's CPU seconds: other processes' load does not count
                step()
                times[t][form].append(time.thread_time() - start)
    torch.set_num_threads(threads)
    rows = []
    for t in task_counts:
        step = {form: min(times[t][form]) for form in FORMS}
        numbers = after[t]
        rows.append({
            "tasks": t, "rank": rank * t, "form": "dense" if dense_is_smaller(rank * t, features, features) else "thin",
            **{f"{form}_s": step[form] for form in FORMS}, "auto_over_dense": step["auto"] / step["dense"],
            **{f"{form}_numbers": numbers[form] for form in FORMS},
            "numbers_over_min": numbers["auto"] / min(numbers["thin"], numbers["dense"]),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny layer (64×64, r=4), a few seconds")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--repeats", type=int, help="timed repeats per point (default 7, smoke 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    features, rank = (64, 4) if args.smoke else (1024, 8)
    repeats = args.repeats or (5 if args.smoke else 7)
    task_counts = [2, 5, 10, 20]
    rows = measure(features, rank, task_counts, repeats, args.seed)

    first, last = rows[0], rows[-1]
    step_growth = last["step_s"] / first["step_s"]
    worst_over_bare = max(row["step_over_bare"] for row in rows)
    threads = {name: os.environ.get(name, "unset") for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    print(
        f"Layer in = out = {features}, LoRA r = {rank} per task, float32 inputs, float64 state; "
        "bare solve = numpy.linalg.solve(C_t, R_t) on the same float64 matrices; "
        f"median of {repeats} repeats; {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
        + ", ".join(f"{name}={value}" for name, value in threads.items())
        + ".\n"
    )
    print("| tasks t | absorb (ms) | solve (ms) | step = absorb + solve (ms) | bare solve (ms) | step / bare |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['tasks']} | {1e3 * row['absorb_s']:.2f} | {1e3 * row['solve_s']:.2f} | {1e3 * row['step_s']:.2f} "
            f"| {1e3 * row['bare_solve_s']:.2f} | {row['step_over_bare']:.2f} |"
        )
    verdict = {True: "met", False: "MISSED"}
    print(
        f"\nstep(t={last['tasks']}) / step(t={first['tasks']}) = {step_growth:.2f} "
        f"(goal ≤ {STEP_GROWTH_GOAL}: {verdict[step_growth <= STEP_GROWTH_GOAL]})"
    )
    print(
        f"LPM step / bare solve, worst over t = {worst_over_bare:.2f} "
        f"(goal ≤ {BARE_SOLVE_GOAL}: {verdict[worst_over_bare <= BARE_SOLVE_GOAL]})"
    )
    form_counts = [2, 5, 10, 20] if args.smoke else [2, 5, 10, 20, 50, 64, 100, 150, 200]
    forms = measure_forms(features, rank, form_counts, repeats, args.seed)
    worst_forms = max(row["auto_over_dense"] for row in forms)
    worst_numbers = max(row["numbers_over_min"] for row in forms)
    switch = next((row["tasks"] for row in forms if row["form"] == "dense"), None)
    print(
        f"\nOne merge step (absorb + export_lora, as the merge stage) with the state kept auto / thin / dense, same "
        f"layer and tasks, one torch thread; the least thread CPU time of {repeats} repeats (the machine is shared: other processes' "
        "load adds wall time, not this thread's CPU time). auto switches to dense at the first t with "
        f"Σr·(in + out) ≥ in·out (Σr ≥ {features * features // (2 * features)} here). State = numbers besides C "
        "(float64): thin Σr·(in + out), dense in·out.\n"
    )
    print("| t | Σr | auto form | auto (ms) | thin (ms) | dense RLS (ms) | auto / dense | state auto (MB) "
          "| state thin (MB) | state dense (MB) | auto / min |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in forms:
        print(
            f"| {row['tasks']} | {row['rank']} | {row['form']} | {1e3 * row['auto_s']:.1f} | {1e3 * row['thin_s']:.1f} "
            f"| {1e3 * row['dense_s']:.1f} | {row['auto_over_dense']:.2f} | {8e-6 * row['auto_numbers']:.2f} "
            f"| {8e-6 * row['thin_numbers']:.2f} | {8e-6 * row['dense_numbers']:.2f} | {row['numbers_over_min']:.2f} |"
        )
    print(
        f"\nauto step / dense RLS step, worst over t = {worst_forms:.2f} (goal ≤ {FORMS_GOAL}: "
        f"{verdict[worst_forms <= FORMS_GOAL]}); state / min(thin, dense), worst over t = {worst_numbers:.2f} "
        f"(goal ≤ 1: {verdict[worst_numbers <= 1.0]}); switched at t = {switch}; "
        f"thin step(t={forms[-1]['tasks']}) / dense = {forms[-1]['thin_s'] / forms[-1]['dense_s']:.2f}."
    )
    if args.smoke:
        print("(smoke size: fixed Python overhead dominates a 64×64 solve; the goals are for the full size)")
    if args.json:
        report = {
            "features": features,
            "rank": rank,
            "repeats": repeats,
            "smoke": args.smoke,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "env": threads,
            "rows": rows,
            "step_growth": step_growth,
            "step_growth_goal": STEP_GROWTH_GOAL,
            "worst_step_over_bare": worst_over_bare,
            "step_over_bare_goal": BARE_SOLVE_GOAL,
            "forms": forms,
            "worst_auto_over_dense": worst_forms,
            "auto_over_dense_goal": FORMS_GOAL,
            "worst_state_over_min": worst_numbers,
            "switch_t": switch,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
