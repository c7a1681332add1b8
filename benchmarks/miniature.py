"""Is MAny's gap to the oracle the method or the miniature? (issue #16, deliverable 2; docs/design.md §7)

Sweeps LoRA rank r × the text model's hidden size d of the tiny LLaVA (its MLP width kept at 2d, α = 2r so the
LoRA scale stays the default's 2) at the config's learning rate, and, at the first rank, other LoRA learning rates
(`--lrs`: they set how far each update moves its layer), over the default mini-UCIT stream (seed 0, UCIT order, one
store for every setting), and measures for each setting the ratios that govern a least-squares merge of T low-rank
updates:

    Σr/d                      how much of a layer's input space the T updates claim together (T·r / d)
    ‖ΔW_i‖/‖W0‖               each task's update against the base weight, Frobenius, mean (and max) over layers and tasks
    leakage, fit error        merge_diagnostics' means after the last task (many.lpm_diagnostics)
    zero-shot                 the base alone (its own projector, no LoRA): what the tasks ask before any fine-tuning

and the scores: individual (the oracle), MAny, and "LPM + own projector" (benchmarks.ablation: the merged LoRA
with each task's own projector, i.e. the LoRA merge's cost alone), each as Last, as the gap to the oracle, and
normalised (quality.normalised: mean over tasks of score / individual's, so one caption task's CIDEr scale does not
decide the comparison).
LLaVA-1.5-7B's Σr/d at the UCIT reference setting (r = 64, d = 4096, HiDe-LLaVA's training scripts) and at r = 8
are printed beside them; its other ratios need the real checkpoint and trained adapters, which this benchmark does
not have. Nothing here picks a setting by a score: the default is chosen by the ratios (BENCHMARKS.md notes).

    python -m benchmarks.miniature [--smoke] [--ranks 2,4,8] [--hidden 128,256] [--lrs 1e-3,5e-4] [--tasks N]
                                   [--store URL] [--plot PNG]

Default: the embedded defaults, 6 tasks, ranks 2,4,8 × hidden 128,256 at the config's learning rate (~1.5 h cold on
two cores; the settings of one hidden size share its base). `--smoke`: examples/tiny.yaml, 2 tasks, ranks 2,4 ×
hidden 32,64.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.ablation import Inputs, evaluate_variants
from benchmarks.common import quiet_environment, stream_config, task_count
from benchmarks.quality import normalised, seeded

METHODS = ("individual", "many", "average")  # average: ablation.Inputs reads its merge
LPM_OWN = "LPM + own projector"
REFERENCE = (("LLaVA-1.5-7B, UCIT reference (r = 64)", 4096, 64), ("LLaVA-1.5-7B, r = 8", 4096, 8))


@dataclass(frozen=True)
class TaskMeasured:
    """One task of one setting: its update's size, and its scores after the last task (percent or CIDEr)."""

    name: str
    update_mean: float  # mean over layers of ‖ΔW_i‖_F / ‖W0‖_F
    zero_shot: float
    individual: float
    many: float
    lpm_own: float


@dataclass(frozen=True)
class Measured:
    """One setting's ratios and scores (scores in percent; Last = mean over the tasks after the last one)."""

    hidden: int
    rank: int
    lr: float  # the LoRA's learning rate (finetune.lr)
    tasks: int
    update_mean: float  # mean over layers and tasks of ‖ΔW_i‖_F / ‖W0‖_F
    update_max: float
    leakage: float | None  # merge_diagnostics' mean off-diagonal leakage after the last task
    fit_error: float | None  # … and mean fit error e_i
    zero_shot: float  # the base alone
    individual: float
    many: float
    lpm_own: float
    many_norm: float | None  # normalised Last: 100 × mean over tasks of score / individual's
    lpm_own_norm: float | None
    seconds: float
    per_task: tuple[TaskMeasured, ...] = ()

    @property
    def sigma(self) -> float:
        return self.tasks * self.rank / self.hidden


def setting(config: Any, hidden: int, rank: int, lr: float | None = None) -> Any:
    """`config` with the text model's hidden size `hidden` (MLP 2·hidden), LoRA rank `rank` (α = 2·rank) and LoRA
    learning rate `lr` (None: the config's; the projector's is left as it is)."""
    tiny = config.base.tiny.model_copy(update={"text_hidden": hidden, "text_intermediate": 2 * hidden})
    lora = config.finetune.lora.model_copy(update={"rank": rank, "alpha": 2.0 * rank})
    return config.model_copy(update={
        "base": config.base.model_copy(update={"tiny": tiny}),
        "finetune": config.finetune.model_copy(update={"lora": lora, "lr": lr or config.finetune.lr}),
        "methods": METHODS,
    })


def grid(hidden: list[int], ranks: list[int], lr: float, more_lrs: list[float]) -> list[tuple[int, int, float]]:
    """The (hidden, rank, lr) settings: every rank × hidden at `lr`, and each other learning rate at the first rank,
    grouped by hidden size (the settings of one hidden size share its base)."""
    extra = [x for x in dict.fromkeys(more_lrs) if x != lr]
    return [(d, r, x) for d in hidden for r, x in [(r, lr) for r in ranks] + [(ranks[0], x) for x in extra]]


def update_ratios(inputs: Inputs, config: Any) -> list[list[float]]:
    """‖ΔW_i‖_F / ‖W0‖_F for every task i (outer list) and LoRA layer (inner) of the run's adapters."""
    import torch

    from many.config import BaseConfig
    from many.evaluate import PEFT_PREFIX
    from many.model.load import load_base
    from tasks.rows.parts import task_deltas

    model, _ = load_base(inputs.base, BaseConfig(dtype="float32", device="cpu"))
    modules = dict(model.named_modules())
    ratios = []
    for task_dir in inputs.finetune:
        deltas = task_deltas(task_dir)  # ΔW (out, in) against W0 (out, in)
        weights = {name: modules[name.removeprefix(PEFT_PREFIX)].weight.detach() for name in deltas}
        ratios.append([float(torch.linalg.norm(delta.detach()) / torch.linalg.norm(weights[name]))
                       for name, delta in deltas.items()])
    return ratios


def zero_shot(inputs: Inputs, config: Any) -> list[float]:
    """Each task's score under the base alone (no LoRA, its own projector)."""
    from many.config import BaseConfig
    from many.data import read_task
    from many.evaluate import Assembly, assemble, evaluate
    from many.model.load import load_base

    model, processor = load_base(inputs.base, BaseConfig(dtype=config.base.dtype, device="cpu"))
    bare = assemble(model, Assembly(), copy_base=False)
    return [evaluate(bare, processor, read_task(d), config.eval).score for d in inputs.data]


def measure(config: Any, store_url: str) -> Measured:
    """Run `config` through the pipeline (cached stages are read, not computed) and measure it."""
    from flows.pipeline import continual_update
    from tasks.store import Store

    start = time.perf_counter()
    summary = continual_update(config)
    seconds = time.perf_counter() - start
    inputs = Inputs.of_run(Store.open(store_url), summary)
    ratios = update_ratios(inputs, config)
    scores, _ = evaluate_variants(inputs, config, names=[LPM_OWN])
    report = summary["report"]
    diagnostics = report.get("diagnostics") or {}
    last = {method: report["methods"][method]["matrix"][-1] for method in ("individual", "many")}
    alone = zero_shot(inputs, config)
    columns = zip(config.tasks, ratios, alone, last["individual"], last["many"], scores[LPM_OWN], strict=True)
    per_task = tuple(TaskMeasured(task.name, statistics.fmean(layers), *row) for task, layers, *row in columns)
    every_layer = [ratio for layers in ratios for ratio in layers]
    return Measured(
        hidden=config.base.tiny.text_hidden, rank=config.finetune.lora.rank, lr=config.finetune.lr,
        tasks=len(config.tasks),
        update_mean=statistics.fmean(every_layer), update_max=max(every_layer),
        leakage=(diagnostics.get("leakage") or {}).get("mean"), fit_error=(diagnostics.get("fit_error") or {}).get("mean"),
        zero_shot=statistics.fmean(alone),
        individual=report["methods"]["individual"]["MFN"], many=report["methods"]["many"]["MFN"],
        lpm_own=statistics.fmean(scores[LPM_OWN]), many_norm=normalised(last["many"], last["individual"]),
        lpm_own_norm=normalised(scores[LPM_OWN], last["individual"]), seconds=seconds, per_task=per_task,
    )


def _cell(value: float | None, form: str = ".2f") -> str:
    return "" if value is None else format(value, form)


def markdown(rows: list[Measured], tasks: list[str]) -> str:
    lines = [f"UCIT order ({' → '.join(tasks)}), seed 0; Last in percent; gap = individual − row; "
             "/ ind. = normalised Last (mean over tasks of score / individual's, percent).", "",
             "| text hidden d | LoRA r | LoRA lr | Σr/d | ‖ΔW‖/‖W0‖ mean (max) | leakage | fit error | zero-shot "
             "| individual | MAny | LPM + own projector | MAny gap | LPM + own gap | MAny / ind. | LPM + own / ind. "
             "| run s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        lines.append(
            f"| {m.hidden} | {m.rank} | {m.lr:g} | {m.sigma:.3f} | {m.update_mean:.3f} ({m.update_max:.3f}) "
            f"| {_cell(m.leakage)} | {_cell(m.fit_error)} | {m.zero_shot:.1f} | {m.individual:.1f} | {m.many:.1f} "
            f"| {m.lpm_own:.1f} | {m.individual - m.many:.1f} | {m.individual - m.lpm_own:.1f} "
            f"| {_cell(m.many_norm, '.1f')} | {_cell(m.lpm_own_norm, '.1f')} | {m.seconds:.0f} |")
    lines += ["", "Per task (scores on the task's own scale: a caption task's CIDEr can pass 100):", "",
              "| d | r | lr | task | ‖ΔW‖/‖W0‖ mean | zero-shot | individual | MAny | LPM + own projector "
              "| MAny / ind. |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        lines += [f"| {m.hidden} | {m.rank} | {m.lr:g} | {t.name} | {t.update_mean:.3f} | {t.zero_shot:.1f} "
                  f"| {t.individual:.1f} | {t.many:.1f} | {t.lpm_own:.1f} "
                  f"| {_cell(normalised([t.many], [t.individual]), '.0f')} |" for t in m.per_task]
    lines += ["", "| reference | d | r | Σr/d (T = " + str(rows[0].tasks) + ") |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {d} | {r} | {rows[0].tasks * r / d:.3f} |" for name, d, r in REFERENCE]
    return "\n".join(lines)


def plot(rows: list[Measured], path: Path) -> None:
    """Gap to the oracle against Σr/d: MAny and LPM + own projector, one marker per hidden size and one marker fill
    per learning rate; the 7B references as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    markers = dict(zip(sorted({m.hidden for m in rows}), "os^D"))
    fills = dict(zip(sorted({m.lr for m in rows}, reverse=True), ("full", "none", "bottom", "left")))
    for label, gap, colour in (("MAny", lambda m: m.individual - m.many, "tab:blue"),
                               (LPM_OWN, lambda m: m.individual - m.lpm_own, "tab:orange")):
        for (hidden, marker), (lr, fill) in itertools.product(markers.items(), fills.items()):
            chosen = sorted((m for m in rows if m.hidden == hidden and m.lr == lr), key=lambda m: m.sigma)
            if chosen:
                suffix = f", lr {lr:g}" if len(fills) > 1 else ""
                axis.plot([m.sigma for m in chosen], [gap(m) for m in chosen], marker=marker, fillstyle=fill,
                          markersize=8, color=colour, label=f"{label}, d = {hidden}{suffix}")
    for name, d, r in REFERENCE:
        axis.axvline(rows[0].tasks * r / d, color="grey", linestyle=":", linewidth=1)
        axis.text(rows[0].tasks * r / d, 0.02, name, transform=axis.get_xaxis_transform(), rotation=90, fontsize=7,
                  va="bottom", ha="right", color="grey")
    axis.set_xscale("log")
    axis.set_xlabel("Σr / d  (T tasks × LoRA rank / text hidden size)")
    axis.set_ylabel("individual Last − row's Last (points)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _ints(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} {text!r}: give comma-separated positive integers, e.g. 2,4,8")
    return values


def _floats(parser: argparse.ArgumentParser, flag: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        parser.error(f"{flag} {text!r}: give comma-separated positive numbers, e.g. 2e-3,5e-4")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="examples/tiny.yaml, 2 tasks, ranks 2,4 × hidden 32,64")
    parser.add_argument("--ranks", help="LoRA ranks (default 2,4,8; smoke 2,4)")
    parser.add_argument("--hidden", help="text hidden sizes (default 128,256; smoke 32,64)")
    parser.add_argument("--lrs", help="more LoRA learning rates, each at the first rank (default: none)")
    parser.add_argument("--tasks", type=int, help="first N tasks of the UCIT order (default all, smoke 2)")
    parser.add_argument("--store", help="store URL shared by every setting (default: a fresh temporary directory)")
    parser.add_argument("--plot", type=Path, help="write the gap-vs-Σr/d figure here (PNG)")
    args = parser.parse_args(argv)
    ranks = _ints(parser, "--ranks", args.ranks or ("2,4" if args.smoke else "2,4,8"))
    hidden = _ints(parser, "--hidden", args.hidden or ("32,64" if args.smoke else "128,256"))
    scratch = Path(tempfile.mkdtemp(prefix="many-miniature-"))
    quiet_environment(scratch)
    config = stream_config(args.smoke)
    n_tasks = task_count(parser, args.tasks, args.smoke, config)
    heads = config.base.tiny.text_heads
    if any(d % heads for d in hidden):
        parser.error(f"--hidden {args.hidden}: each size must be a multiple of the {heads} attention heads")
    store = args.store or str(scratch / "store")
    base = seeded(config, 0, "ucit", n_tasks, store, systems=False)
    more = _floats(parser, "--lrs", args.lrs) if args.lrs else []
    rows = []
    for d, r, lr in grid(hidden, ranks, config.finetune.lr, more):
        print(f"  text hidden {d}, LoRA rank {r}, lr {lr:g} …", file=sys.stderr, flush=True)
        rows.append(measure(setting(base, d, r, lr), store))
    stream = "examples/tiny.yaml" if args.smoke else "embedded mini-UCIT defaults"
    print(f"Stream: {stream}, {n_tasks} tasks, one store for every setting.\n")
    print(markdown(rows, [t.name for t in base.tasks]))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nFigure: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
