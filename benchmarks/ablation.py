"""Where MAny's gap to the individual oracle comes from (issue #8: "investigate … which layers … write down what
you found"). Reads the final model of each seed's UCIT-order run and evaluates it taken apart:

    LoRA      own (task j's, the oracle's) | LPM merge (MAny's) | LPM on attention or MLP layers only | average | none
    projector own (task j's)               | CPM-routed over every task's (MAny's)

so "own LoRA + CPM" is the cost of routing alone, "LPM + own projector" the cost of the LoRA merge alone, and the
two sanity rows (own + own = individual, LPM + CPM = MAny) must reproduce the pipeline's own Last. Also the CPM
routing accuracy on the test images: the share whose highest routing weight falls on their own task, for the cosine
and for the Gaussian routing of `cpm.metric: mahalanobis`.

The runs go through `flows.pipeline.continual_update` exactly as benchmarks.quality runs them (same seeds, same
config), so with `--store` pointing at the store quality used, every stage is cached and only the variants below
are computed; with a fresh store the runs are computed first. Nothing here changes the method or its defaults.

    python -m benchmarks.ablation [--smoke] [--seeds N] [--store URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import quiet_environment, seed_count, stream_config
from benchmarks.quality import seeded

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

# (name, LoRA source, projector source)
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("own LoRA + own projector (= individual)", "own", "own"),
    ("own LoRA + CPM", "own", "cpm"),
    ("LPM + own projector", "lpm", "own"),
    ("LPM + CPM (= MAny)", "lpm", "cpm"),
    ("LPM attention only + own projector", "lpm_attention", "own"),
    ("LPM MLP only + own projector", "lpm_mlp", "own"),
    ("average LoRA + CPM", "average", "cpm"),
    ("no LoRA + own projector", "none", "own"),
)

SANITY = {"own LoRA + own projector (= individual)": "individual", "LPM + CPM (= MAny)": "many"}  # row: pipeline method


@dataclass(frozen=True)
class Inputs:
    """The final step's inputs of one run, as local files: the base, each task's data, finetune dir and prototypes,
    and the LPM and average merges."""

    base: Path
    data: list[Path]
    finetune: list[Path]
    prototypes: list[Path]
    lpm: Path
    average: Path

    @classmethod
    def of_run(cls, store: Any, summary: Mapping[str, Any]) -> Inputs:
        """From a run summary (`continual_update`'s return value) and the store it ran into."""
        tasks = summary["tasks"]

        def local(stage: str, output: str, task: str | None = None) -> Path:
            entry = next(r for r in summary["stages"] if r["stage"] == stage and r.get("task") == task)
            manifest = store.read_manifest(stage, entry["key"])
            return store.materialize(manifest.outputs[output], context=f"ablation: {stage} {task or ''}")

        return cls(
            base=local("base", "model"),
            data=[local("data", "task", t) for t in tasks],
            finetune=[local("finetune", "task", t) for t in tasks],
            prototypes=[local("prototypes", "prototypes", t) for t in tasks],
            lpm=local("merge", "adapter", tasks[-1]),
            average=local("merge_average", "deltas", tasks[-1]),
        )


def lora_sources(inputs: Inputs) -> dict[str, Callable[[int], dict]]:
    """{source: task index j → ΔW per PEFT module name}."""
    from safetensors.torch import load_file

    from many.adapters import lora_factors
    from many.evaluate import lora_deltas

    lpm = lora_deltas(lora_factors(inputs.lpm))
    attention = {n: d for n, d in lpm.items() if n.rsplit(".", 1)[-1] in ATTENTION}
    mlp = {n: d for n, d in lpm.items() if n not in attention}
    average = load_file(str(inputs.average))
    own = [lora_deltas(lora_factors(d / "adapter")) for d in inputs.finetune]
    return {
        "own": lambda j: own[j], "lpm": lambda j: lpm, "lpm_attention": lambda j: attention,
        "lpm_mlp": lambda j: mlp, "average": lambda j: average, "none": lambda j: {},
    }


def evaluate_variants(inputs: Inputs, config: Any, names: Sequence[str] | None = None
                      ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """({variant: score per task (percent)}, {metric: CPM routing accuracy on the test images} for the cosine and
    the Gaussian routing of `cpm.metric`) of one run's final model, for the VARIANTS named in `names` (default: all)."""
    from many.adapters import projector_state
    from many.config import BaseConfig
    from many.data import read_task
    from many.evaluate import Assembly, assemble, cpm_router, evaluate, routing_accuracy
    from many.model.load import load_base
    from many.prototypes import image_features

    base_model, processor = load_base(inputs.base, BaseConfig(dtype=config.base.dtype, device="cpu"))
    tasks = [read_task(d) for d in inputs.data]
    projectors = tuple(projector_state(d) for d in inputs.finetune)
    router = cpm_router(inputs.prototypes, config.cpm)
    sources = lora_sources(inputs)
    scores: dict[str, list[float]] = {}
    for name, lora, projector in VARIANTS:
        if names is not None and name not in names:
            continue
        row = []
        for j, task in enumerate(tasks):
            if projector == "cpm":
                assembly = Assembly(sources[lora](j), projectors, router)
            else:
                assembly = Assembly(sources[lora](j), (projectors[j],))
            model = assemble(base_model, assembly)
            row.append(evaluate(model, processor, task, config.eval, routing=assembly.router).score)
            del model
        scores[name] = row
        print(f"    {name}: {statistics.fmean(row):.1f}", file=sys.stderr, flush=True)
    test_features = [image_features(base_model, processor, task.test[: config.eval.max_samples]) for task in tasks]
    accuracy = {}
    for metric in ("cosine", "mahalanobis"):
        routed = cpm_router(inputs.prototypes, config.cpm.model_copy(update={"metric": metric}))
        accuracy[metric] = routing_accuracy(test_features, routed.prototypes, routed.precision)
    return scores, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="examples/tiny.yaml, 2 tasks, 1 seed")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 3, smoke 1)")
    parser.add_argument("--store", help="the store benchmarks.quality used (default: a fresh temporary directory)")
    args = parser.parse_args(argv)
    seeds = seed_count(parser, args.seeds, args.smoke)
    scratch = Path(tempfile.mkdtemp(prefix="many-ablation-"))
    quiet_environment(scratch)
    from flows.pipeline import continual_update
    from tasks.store import Store

    config = stream_config(args.smoke)
    n_tasks = 2 if args.smoke else len(config.tasks)
    store_url = args.store or str(scratch / "store")
    per_seed, accuracy, last = [], [], []
    for seed in range(seeds):
        cfg = seeded(config, seed, "ucit", n_tasks, store_url, systems=False)
        cfg = cfg.model_copy(update={"methods": tuple(dict.fromkeys((*cfg.methods, "many", "individual", "average")))})
        print(f"  seed {seed}: the UCIT-order run (cached if quality ran into this store) …", file=sys.stderr, flush=True)
        summary = continual_update(cfg)
        computed = sum(s["status"] == "computed" for s in summary["stages"])
        print(f"    {computed} of {len(summary['stages'])} stages computed", file=sys.stderr, flush=True)
        scores, routed = evaluate_variants(Inputs.of_run(Store.open(store_url), summary), cfg)
        per_seed.append(scores)
        accuracy.append(routed)
        last.append({m: summary["report"]["methods"][m]["MFN"] for m in ("individual", "many")})
    tasks = [t.name for t in cfg.tasks]

    def cell(values: list[float]) -> str:
        return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    stream = "examples/tiny.yaml" if args.smoke else "embedded mini-UCIT defaults"
    print(f"Final model of the UCIT-order run ({stream}, {n_tasks} tasks, seeds 0..{seeds - 1}), taken apart; "
          "score per task and their mean (= Last), mean ± std over seeds.\n")
    print("| LoRA + projector | Last | " + " | ".join(tasks) + " |")
    print("|---|---:|" + "---:|" * len(tasks))
    for name, _, _ in VARIANTS:
        means = [statistics.fmean(s[name]) for s in per_seed]
        columns = [cell([s[name][j] for s in per_seed]) for j in range(len(tasks))]
        print(f"| {name} | {cell(means)} | " + " | ".join(columns) + " |")
    sane = all(abs(statistics.fmean(s[row]) - x[method]) < 0.05 for s, x in zip(per_seed, last, strict=True)
               for row, method in SANITY.items())
    print(f"\nThe pipeline's own Last, same runs: individual {cell([x['individual'] for x in last])}, "
          f"MAny {cell([x['many'] for x in last])}: the two sanity rows above "
          f"{'match them on every seed' if sane else 'DO NOT MATCH them: this harness is not the pipeline eval'}.")
    print("CPM routing accuracy on the test images (highest weight on the image's own task): "
          f"cosine {cell([100 * a['cosine'] for a in accuracy])} %, "
          f"Gaussian (cpm.metric: mahalanobis) {cell([100 * a['mahalanobis'] for a in accuracy])} %.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
