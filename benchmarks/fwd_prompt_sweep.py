"""Can Fwd-Prompt's prompt tuning learn a mini-UCIT task at all? (issue #16, deliverable 5; docs/design.md §1.4)

One task at a time from the pretrained tiny base, so every number is that task's MFT-like score (its own test split
right after training on it, no forgetting involved): Fwd-Prompt's prompts trained for each (lr × n_prompts) of the
grid, with and without the gradient projection, beside two references from the same base and data — the base with
no training at all (the floor), and the task's own LoRA + projector fine-tune (`individual`, the ceiling).

The grid is not tuned to any method: it brackets the configured default (lr 1.0, 8 prompts) by factors of 10 in lr
and 4 in length. The base is pretrained once (minutes; seed 0, so the same base every time) and can be reused with
--base DIR.

    python -m benchmarks.fwd_prompt_sweep [--smoke] [--tasks noisy-caption,style-cls] [--lrs 0.01,0.1,1,10] [--prompts 2,8,32]
                                          [--steps N] [--n-train N] [--n-test N] [--base DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import quiet_environment, stream_config


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="examples/tiny.yaml's sizes, one task, one cell unless given (seconds)")
    parser.add_argument("--tasks", help="comma-separated mini-UCIT task kinds (default noisy-caption,style-cls)")
    parser.add_argument("--lrs", help="Fwd-Prompt SGD learning rates (default 0.01,0.1,1,10)")
    parser.add_argument("--prompts", help="numbers of prompt tokens (default 2,8,32)")
    parser.add_argument("--steps", type=int, help="optimizer steps per training (default: the config's finetune.steps)")
    parser.add_argument("--n-train", type=int, help="training samples per task (default: the config's)")
    parser.add_argument("--n-test", type=int, help="test samples per task (default: the config's)")
    parser.add_argument("--no-unprojected", action="store_true", help="skip the project=False column")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the base and own-LoRA rows (when another run of the same base measured them)")
    parser.add_argument("--base", type=Path, help="a base model dir to reuse (else pretrained here and kept in the scratch dir)")
    parser.add_argument("--json", type=Path, help="also write every cell here")
    args = parser.parse_args(argv)
    defaults = ("style-cls", "1", "8") if args.smoke else ("noisy-caption,style-cls", "0.01,0.1,1,10", "2,8,32")
    args.tasks, args.lrs, args.prompts = (given or default for given, default in
                                          zip((args.tasks, args.lrs, args.prompts), defaults, strict=True))
    scratch = Path(tempfile.mkdtemp(prefix="many-fwd-sweep-"))
    quiet_environment(scratch)

    import torch

    torch.set_num_threads(1)
    from many.adapters import save_task
    from many.data import make_task, pretrain_samples
    from many.evaluate import assemble, evaluate
    from many.methods.fwd_prompt import FwdPromptConfig, prompted_model, prompted_samples, train_task
    from many.model.load import load_base
    from many.pretrain import make_base
    from many.training import finetune
    from tasks.rows.parts import own

    config = stream_config(args.smoke)
    mini = config.data.mini_ucit.model_copy(update={k: v for k, v in
                                                    (("n_train", args.n_train), ("n_test", args.n_test)) if v})
    steps = args.steps or config.finetune.steps
    base_dir = args.base
    if base_dir is None:
        print("  pretraining the base …", file=sys.stderr, flush=True)
        base_dir = make_base(config.base.model_copy(update={"device": "cpu"}),
                             pretrain_samples(mini, config.data.pretrain_samples), scratch / "base", progress=False)
        print(f"  base: {base_dir}", file=sys.stderr, flush=True)
    model, processor = load_base(base_dir, config.base.model_copy(update={"device": "cpu"}))
    cells: list[dict[str, Any]] = []

    token_norm = float(model.get_input_embeddings().weight.detach().norm(dim=1).median())

    def record(task: str, method: str, lr: float | None, n: int | None, score: float, loss: float | None,
               seconds: float, prompt_norm: float | None = None) -> None:
        cells.append({"task": task, "method": method, "lr": lr, "n_prompts": n, "score": score, "final_loss": loss,
                      "prompt_norm": prompt_norm, "seconds": seconds})
        print(f"  {task:14s} {method:22s} lr={lr!s:6s} n={n!s:4s} score {score:6.1f}  loss {loss if loss is None else round(loss, 4)!s:8s}"
              f" {seconds:5.0f} s", file=sys.stderr, flush=True)

    for kind in [t for t in args.tasks.split(",") if t]:
        task = make_task(kind, mini)
        if not args.no_references:
            start = time.perf_counter()
            record(kind, "base (no training)", None, None,
                   evaluate(model, processor, task, config.eval).score, None, time.perf_counter() - start)
            start = time.perf_counter()
            losses: list[float] = []
            trained = finetune(model, processor, task.train, config.finetune.model_copy(update={"steps": steps}),
                               progress=False, on_step=lambda s: losses.append(s.loss))
            save_task(trained, scratch / "own" / kind)
            own_model = assemble(model, own(scratch / "own" / kind))
            record(kind, "own LoRA + projector", config.finetune.lr, None,
                   evaluate(own_model, processor, task, config.eval).score, sum(losses[-10:]) / 10,
                   time.perf_counter() - start)
        for project in (True, False) if not args.no_unprojected else (True,):
            for n in _ints(args.prompts):
                for lr in _floats(args.lrs):
                    cfg = FwdPromptConfig(n_prompts=n, lr=lr, steps=steps, batch_size=config.finetune.batch_size,
                                          project=project)
                    start, losses = time.perf_counter(), []
                    state = train_task(model, processor, task.train, None, cfg, progress=False,
                                       on_step=lambda s: losses.append(s.loss))
                    prompted, prompted_processor = prompted_model(model, processor, state)
                    test = replace(task, test=prompted_samples(task.test, n))
                    score = evaluate(prompted, prompted_processor, test, config.eval).score
                    record(kind, "fwd_prompt" + ("" if project else " (no projection)"), lr, n, score,
                           sum(losses[-10:]) / min(10, len(losses)), time.perf_counter() - start,
                           float(state.prompts.norm(dim=1).median()))

    stream = "examples/tiny.yaml" if args.smoke else "embedded mini-UCIT defaults"
    print(f"Stream: {stream} sizes, n_train {mini.n_train}, n_test {mini.n_test}, {steps} steps per training, "
          "one task at a time from the base (the score is the task's own test split right after training: MFT).\n")
    print(f"Median norm of a token embedding of the base: {token_norm:.3f}; a prompt's is shown after training.\n")
    print("| task | method | lr | prompts | score | final loss (mean of last 10 steps) | median prompt norm | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        loss = "" if c["final_loss"] is None else f"{c['final_loss']:.3f}"
        norm = "" if c["prompt_norm"] is None else f"{c['prompt_norm']:.2f}"
        print(f"| {c['task']} | {c['method']} | {'' if c['lr'] is None else c['lr']:} | "
              f"{'' if c['n_prompts'] is None else c['n_prompts']} | {c['score']:.1f} | {loss} | {norm} | "
              f"{c['seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"stream": stream, "steps": steps, "token_norm": token_norm, "cells": cells},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
