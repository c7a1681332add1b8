"""Quality of every method on the mini-UCIT stream through the real pipeline (issue #8, docs/design.md §1 "Metrics").

For each seed s and task order (UCIT order, and its reverse) one `flows.pipeline.continual_update` run with
base.seed = finetune.seed = data.mini_ucit.seed = s, all into ONE store, so whatever two runs share is computed
once (a seed's base, data, finetunes, statistics and prototypes serve both orders; only the order-dependent merges,
SeqLoRA chain and eval rows are recomputed). The reports are aggregated per order and method as mean ± std
over seeds of Last (MFN), normalised Last, MFT, MAA and BWT, with each row's size, and checked against issue #8's
goals, stated here and never tuned to a method:

    MAny Last ≥ SeqLoRA Last + 15     MAny Last > every merge baseline's Last
    MAny Last ≥ individual Last − 3   MAny BWT ≥ −2

Normalised Last = 100 × mean over tasks j of A[T−1][j] / individual's A[T−1][j] (tasks where individual scores 0
left out), so a caption task's CIDEr-heavy scale, which can exceed 100, does not outweigh the others. Sizes, from each
row's last eval (tasks.rows.parts.footprint): trainable parameters over the whole stream, and the bytes of the tensors
the final model answers with divided by the number of tasks (what is kept only to train further, such as MAny's RLS
state and Grams or Fwd-Prompt's core basis, is not counted).

Default: the embedded mini-UCIT defaults, 6 tasks, 3 seeds, both orders (~25 min per seed and order on two
cores, cold). `--config PATH`: that run config file's stream instead (benchmarks/quality_stress.py streams
examples/stress.yaml).
`--smoke`: examples/tiny.yaml, 2 tasks, 1 seed (a minute or two).

    python -m benchmarks.quality [--smoke] [--config YAML] [--seeds N] [--orders ucit,reverse] [--tasks N]
                                 [--store URL] [--json PATH] [--no-systems] [--plots DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import quiet_environment, seed_count, stream_config, task_count

ORDERS = ("ucit", "reverse")
SUMMARY = (("Last", "MFN"), ("MFT", "MFT"), ("MAA", "MAA"), ("BWT", "BWT"))
SIZES = (("params", "trainable_parameters"), ("bytes", "bytes_per_task"))  # scalars of a report row
MERGE_BASELINES = ("average", "task_arithmetic", "ties", "regmean")
MANY_FAMILY = ("many", "many_r", "many_r_cos", "many_all", "many_cos", "many_xl")  # MAny and its levers (issue #16)
SYSTEMS = ("cram", "cram_lda", "fwd_prompt")  # the other continual-learning systems (issue #10): opt-in in a run,
# always here; cram_lda is CRAM's experts routed as many_r routes by default (its evals only: the experts are CRAM's)
# The levers' rows, always here: a CPU chain and its evals each, except many_xl, whose merge at step t re-reads every
# task ≤ t's training samples (about one finetune's compute per step on mini-UCIT); many_cos and many_r_cos are the
# published cosine routing, the ablation of the default Gaussian (their evals only); many_all the all-token merge
EXTRA_ROWS = ("many_r", "many_r_cos", "many_all", "many_cos", "many_xl")


def seeded(config: Any, seed: int, order: str, tasks: int, store: str, systems: bool = True) -> Any:
    """`config` for one replicate: every seed set to `seed`, the first `tasks` tasks in `order`, into `store`,
    with MAny-R, and CRAM and Fwd-Prompt unless `systems` is False, added to the config's methods."""
    stream = config.tasks[:tasks]
    return config.model_copy(update={
        "methods": tuple(dict.fromkeys((*config.methods, *EXTRA_ROWS, *(SYSTEMS if systems else ())))),
        "tasks": stream if order == "ucit" else tuple(reversed(stream)),
        "base": config.base.model_copy(update={"seed": seed}),
        "finetune": config.finetune.model_copy(update={"seed": seed}),
        "data": config.data.model_copy(update={"mini_ucit": config.data.mini_ucit.model_copy(update={"seed": seed})}),
        "store": config.store.model_copy(update={"url": store}),
    })


def normalised(scores: list[float], oracle: list[float | None]) -> float | None:
    """100 × mean_j scores[j] / oracle[j] over the tasks where the oracle scores above 0 (None when it never does)."""
    pairs = [(m, i) for m, i in zip(scores, oracle) if i and i > 0]
    return 100 * statistics.fmean(m / i for m, i in pairs) if pairs else None


def normalised_last(report: dict[str, Any], method: str) -> float | None:
    """`normalised` of the method's last row against individual's; None without an individual row."""
    if "individual" not in report["methods"]:
        return None
    return normalised(report["methods"][method]["matrix"][-1], report["methods"]["individual"]["matrix"][-1])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(reports: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """{method: {metric: (mean, std)}} over the replicates' reports (std 0 for one replicate): SUMMARY's metrics,
    "Last / ind." (normalised Last) when the runs have an individual row, and SIZES when every report has them."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method in reports[0]["methods"]:
        out[method] = {label: _mean_std([r["methods"][method][key] for r in reports]) for label, key in SUMMARY}
        normalised = [normalised_last(r, method) for r in reports]
        if all(v is not None for v in normalised):
            out[method]["Last / ind."] = _mean_std(normalised)
        for label, key in SIZES:
            values = [r["methods"][method].get(key) for r in reports]
            if all(v is not None for v in values):
                out[method][label] = _mean_std(values)
    return out


def goals(table: dict[str, dict[str, tuple[float, float]]]) -> list[tuple[str, str, bool]]:
    """Issue #8's goals on the mean values: (goal, measured, met); goals whose methods did not run are skipped."""
    if "many" not in table:
        return []
    last = {m: row["Last"][0] for m, row in table.items()}
    many = last["many"]
    rows = []
    if "seqlora" in last:
        rows.append(("MAny Last ≥ SeqLoRA Last + 15", f"{many - last['seqlora']:+.1f}", many >= last["seqlora"] + 15))
    merges = [m for m in MERGE_BASELINES if m in last]
    if merges:
        best = max(merges, key=last.__getitem__)
        rows.append((f"MAny Last > best merge baseline ({best})", f"{many - last[best]:+.1f}", many > last[best]))
    if "individual" in last:
        rows.append(("MAny Last ≥ individual Last − 3", f"{many - last['individual']:+.1f}", many >= last["individual"] - 3))
    bwt = table["many"]["BWT"][0]
    rows.append(("MAny BWT ≥ −2", f"{bwt:+.1f}", bwt >= -2))
    return rows + family_goals(table)


def family_goals(table: dict[str, dict[str, tuple[float, float]]]) -> list[tuple[str, str, bool]]:
    """Issue #16's goals for MAny and its levers, on the mean values: MAny within 10 points of the oracle, the best
    MAny-family row within 3 and with BWT ≥ −2, and that row ahead of CRAM and Fwd-Prompt; skipped where the rows did
    not run."""
    last = {m: row["Last"][0] for m, row in table.items()}
    family = [m for m in MANY_FAMILY if m in last]
    if "individual" not in last or not family:
        return []
    oracle = last["individual"]
    best = max(family, key=last.__getitem__)
    rows = []
    if "many" in last:
        rows.append(("MAny Last ≥ individual Last − 10 (issue #16)", f"{last['many'] - oracle:+.1f}",
                     last["many"] >= oracle - 10))
    rows.append((f"best MAny-family Last ({best}) ≥ individual Last − 3", f"{last[best] - oracle:+.1f}",
                 last[best] >= oracle - 3))
    rows.append((f"best MAny-family BWT ({best}) ≥ −2", f"{table[best]['BWT'][0]:+.1f}", table[best]["BWT"][0] >= -2))
    for system in SYSTEMS:
        if system in last:
            rows.append((f"best MAny-family Last ({best}) > {system}", f"{last[best] - last[system]:+.1f}",
                         last[best] > last[system]))
    return rows


COLUMNS = ("Last", "Last / ind.", "MFT", "MAA", "BWT")


def markdown(order: str, tasks: list[str], n_seeds: int, table: dict[str, dict[str, tuple[float, float]]]) -> str:
    """The order's table: COLUMNS as mean ± std ("Last / ind." = normalised Last, %), then trainable parameters and
    bytes stored per task (means; empty where a row did not report them), then issue #8's goals."""
    lines = [f"**{order} order** ({' → '.join(tasks)}), mean ± std over {n_seeds} seed(s)", "",
             "| method | " + " | ".join(COLUMNS) + " | trainable parameters | bytes per task |",
             "|---|" + "---:|" * (len(COLUMNS) + 2)]
    for method, row in table.items():
        cells = ["" if label not in row else f"{row[label][0]:+.1f} ± {row[label][1]:.1f}" if label == "BWT"
                 else f"{row[label][0]:.1f} ± {row[label][1]:.1f}" for label in COLUMNS]
        cells += [f"{row[label][0]:,.0f}" if label in row else "" for label, _ in SIZES]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    checks = goals(table)
    if checks:
        lines += ["", "| goal (issues #8, #16) | measured | met |", "|---|---:|---|"]
        lines += [f"| {goal} | {value} | {'yes' if met else 'no'} |" for goal, value, met in checks]
    return "\n".join(lines)


def _stream_name(path: Path) -> str:
    """The config file as the table names it: relative to the repository when inside it."""
    root = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="examples/tiny.yaml, 2 tasks, 1 seed")
    parser.add_argument("--config", type=Path, help="stream this run config file (default: the embedded defaults; "
                        "smoke: examples/tiny.yaml)")
    parser.add_argument("--seeds", type=int, help="replicates, seeds 0..N-1 (default 3, smoke 1)")
    parser.add_argument("--orders", default=",".join(ORDERS), help="comma-separated subset of: " + ", ".join(ORDERS))
    parser.add_argument("--tasks", type=int, help="first N tasks of the UCIT order (default all, smoke 2)")
    parser.add_argument("--store", help="store URL shared by every run (default: a fresh temporary directory)")
    parser.add_argument("--json", type=Path, help="also write every report and the aggregate here")
    parser.add_argument("--no-systems", action="store_true",
                        help="leave out CRAM and Fwd-Prompt (each costs about one more finetune per task)")
    parser.add_argument("--plots", type=Path, help="render each run's report (many.report.render) to DIR/<order>-seed<s>/")
    args = parser.parse_args(argv)
    orders = [o for o in args.orders.split(",") if o]
    if not orders or any(o not in ORDERS for o in orders):
        parser.error(f"--orders {args.orders!r}: choose a comma-separated subset of {', '.join(ORDERS)}")
    seeds = seed_count(parser, args.seeds, args.smoke)
    scratch = Path(tempfile.mkdtemp(prefix="many-quality-"))
    quiet_environment(scratch)
    from flows.pipeline import continual_update
    from many.report import render

    config = stream_config(args.smoke, args.config)
    n_tasks = task_count(parser, args.tasks, args.smoke, config)
    store = args.store or str(scratch / "store")

    reports: dict[str, list[dict[str, Any]]] = {o: [] for o in orders}
    timings = []
    for seed in range(seeds):
        for order in orders:
            cfg = seeded(config, seed, order, n_tasks, store, systems=not args.no_systems)
            print(f"  seed {seed}, {order} order: {len(cfg.tasks)} tasks × {len(cfg.methods)} methods …", file=sys.stderr, flush=True)
            start = time.perf_counter()
            summary = continual_update(cfg)
            computed = sum(s["status"] == "computed" for s in summary["stages"])
            timings.append((seed, order, computed, len(summary["stages"]), time.perf_counter() - start))
            reports[order].append(summary["report"])
            if args.plots:
                render(summary["report"], args.plots / f"{order}-seed{seed}")

    stream = (_stream_name(args.config) if args.config
              else "examples/tiny.yaml" if args.smoke else "embedded mini-UCIT defaults")
    print(f"Stream: {stream}, {n_tasks} tasks, seeds 0..{seeds - 1}, one store for every run.\n")
    tables = {}
    for order in orders:
        tables[order] = aggregate(reports[order])
        print(markdown(order, reports[order][0]["tasks"], seeds, tables[order]) + "\n")
    if args.plots:
        print(f"Plots: {args.plots}/<order>-seed<s>/report.html, heatmap_<method>.png, forgetting.png\n")
    print("| seed | order | stages computed | seconds |\n|---|---|---:|---:|")
    for seed, order, computed, total, seconds in timings:
        print(f"| {seed} | {order} | {computed} / {total} | {seconds:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "stream": stream, "tasks": n_tasks, "seeds": seeds, "reports": reports,
            "aggregate": {o: {m: {k: list(v) for k, v in row.items()} for m, row in t.items()} for o, t in tables.items()},
            "seconds": [{"seed": s, "order": o, "computed": c, "seconds": x} for s, o, c, _, x in timings],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
