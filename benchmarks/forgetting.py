"""Library-level quality check on the default mini-UCIT stream (no pipeline, no cache).

Trains the base, one LoRA + projector per task, and the SeqLoRA chain; then evaluates SeqLoRA's full
accuracy matrix, the individual (task-id oracle) diagonal, and the final row of MAny (LPM + CPM), LPM with
an averaged projector, averaged LoRAs with CPM, and plain averaging. Prints markdown tables.
This is the quick honest read on DESIGN.md §8's lessons; benchmarks/quality.py (through the pipeline,
3 seeds, two orders) is the full benchmark.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from many import cpm, lpm, metrics
from many.adapters import lora_factors
from many.config import BaseConfig, CPMConfig, EvalConfig, FinetuneConfig, LPMConfig, StatsConfig, TinyModelConfig
from many.data import UCIT_ORDER, MiniUcitConfig, make_task, pretrain_samples, vocabulary
from many.evaluate import Assembly, assemble, evaluate, lora_deltas
from many.merging import merge_model
from many.model.load import load_base
from many.model.pretrain import make_base
from many.prototypes import image_features
from many.stats import collect_grams
from many.training import finetune, projector_state, save_task


def average_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tasks", type=int, default=len(UCIT_ORDER))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.smoke:
        data_cfg = MiniUcitConfig(n_train=32, n_test=8, image_size=16)
        base_cfg = BaseConfig(tiny=TinyModelConfig(image_size=16, text_hidden=32, vision_hidden=32, text_intermediate=64),
                              pretrain_steps=5, device="cpu")
        ft_cfg, n_pretrain = FinetuneConfig(steps=5, batch_size=8), 64
    else:
        data_cfg, base_cfg, ft_cfg, n_pretrain = MiniUcitConfig(), BaseConfig(device="cpu"), FinetuneConfig(), 5000
    eval_cfg = EvalConfig()
    names = UCIT_ORDER[: args.tasks]
    tasks = [make_task(k, data_cfg) for k in names]
    seconds: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="many-forgetting-"))

    start = time.perf_counter()
    base_dir = make_base(base_cfg, vocabulary(), pretrain_samples(data_cfg, n_pretrain), work / "base", progress=False)
    base, processor = load_base(base_dir, base_cfg)
    seconds["base"] = time.perf_counter() - start

    start = time.perf_counter()
    own_dirs, seq_dirs, grams, feats = [], [], [], []
    for i, task in enumerate(tasks):
        own = finetune(base, processor, task.train, ft_cfg, progress=False)
        own_dirs.append(save_task(own, work / f"own-{i}"))
        grams.append(collect_grams(own, processor, task.train, StatsConfig(), progress=False))
        feats.append(image_features(base, processor, task.train))
        seq = finetune(base, processor, task.train, ft_cfg, init_dir=seq_dirs[-1] if seq_dirs else None, progress=False)
        seq_dirs.append(save_task(seq, work / f"seq-{i}"))
    seconds["finetune+stats"] = time.perf_counter() - start

    factors = [lora_factors(d / "adapter") for d in own_dirs]
    projectors = [projector_state(d) for d in own_dirs]
    prototypes = torch.stack([cpm.prototype(f) for f in feats])
    tau = cpm.calibrate_tau(feats, prototypes, CPMConfig().calibration_target)

    states = None
    for f, g in zip(factors, grams, strict=True):
        states = lpm.absorb_model(states, f, g, LPMConfig())
    lpm_deltas = {name: lpm.solve(s, name).float() for name, s in states.items()}
    avg_deltas = merge_model("average", {n: [lora_deltas(f)[n] for f in factors] for n in factors[0]})
    avg_projector = average_state(projectors)

    def score(assembly: Assembly, task) -> float:
        model = assemble(base, assembly)
        return evaluate(model, processor, task, eval_cfg, routing=assembly.router).score

    start = time.perf_counter()
    T = len(tasks)
    seq = [[score(Assembly(lora_deltas(lora_factors(seq_dirs[t] / "adapter")), (projector_state(seq_dirs[t]),)), tasks[j])
            if j <= t else None for j in range(T)] for t in range(T)]
    oracle = [score(Assembly(lora_deltas(factors[j]), (projectors[j],)), tasks[j]) for j in range(T)]
    final_rows = {
        "MAny (LPM + CPM)": Assembly(lpm_deltas, tuple(projectors), "cpm", prototypes, tau),
        "LPM + averaged projector": Assembly(lpm_deltas, (avg_projector,)),
        "average LoRA + CPM": Assembly(avg_deltas, tuple(projectors), "cpm", prototypes, tau),
        "average LoRA + averaged projector": Assembly(avg_deltas, (avg_projector,)),
    }
    rows = {name: [score(a, t) for t in tasks] for name, a in final_rows.items()}
    seconds["eval"] = time.perf_counter() - start

    result = {"tasks": list(names), "tau": tau, "seconds": seconds, "seqlora_matrix": seq, "individual": oracle,
              "final_rows": rows, "seqlora": metrics.summarize(seq)}
    header = "| method | " + " | ".join(names) + " | Last |\n|---|" + "---|" * (T + 1)
    lines = [header]
    for name, row in [("individual (oracle, diagonal)", oracle), ("SeqLoRA", seq[-1]), *rows.items()]:
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {sum(row) / T:.1f} |")
    print(f"mini-UCIT, 1 seed, default sizes{' (smoke)' if args.smoke else ''}; τ calibrated = {tau:.4f}\n")
    print("\n".join(lines))
    print(f"\nSeqLoRA first task across the stream: {' → '.join(f'{seq[t][0]:.1f}' for t in range(T))} "
          f"(BWT {result['seqlora']['BWT']:.1f})")
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
