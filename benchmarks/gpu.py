"""GPU check (issue #17): the tiny pipeline on CUDA, and a LoRA fine-tuning step of a 7B-shaped LLaVA in bf16 through
`many.training.finetune` against a bare PEFT loop on the same model and batches. One command, a few minutes:

    python -m benchmarks.gpu [--json PATH]      needs CUDA: without it, one line on stderr and exit 2
    python -m benchmarks.gpu --smoke            CPU, toy shapes, no pipeline run: what the tests run

7B-shaped: LLaVA-1.5-7B's decoder (hidden 4096, 32 layers, 32 heads, MLP 11008) and vision tower (CLIP ViT-L/14 at
336 px: hidden 1024, 24 layers, 16 heads, 576 image tokens), randomly initialised on the GPU in bf16 — no weights
are downloaded; the vocabulary is the benchmark's own few words, not 32 000 (the LM head is then ~2 % of the
compute it would be). Both loops train LoRA r = 8 on every decoder linear layer plus the projector (fp32 master
weights, bf16 autocast), same batches, same AdamW; rounds alternate and each rate is a median. Goal: many's steps/s
≥ 0.9 × the bare loop's (the CPU goal of benchmarks/train_overhead, now at 7B shapes on a GPU).

The pipeline part runs examples/tiny.yaml with every stage kind on the GPU (`resources.*.num_gpus: 0.25`) as a
`many run` command into a fresh store and reports its wall time and compute seconds per stage kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import EXAMPLES, quiet_environment

GOAL_RATIO = 0.9
GPU_SHARE = 0.25  # of the one GPU per stage: up to four tiny stages share it at once
GROUPS = ("data", "base", "finetune", "prototypes", "stats", "merge", "eval")
SEVEN_B = {"image_size": 336, "patch_size": 14, "vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16,
           "text_hidden": 4096, "text_layers": 32, "text_heads": 32, "text_intermediate": 11008, "max_length": 640}
TOY = {"image_size": 32, "patch_size": 8, "vision_hidden": 32, "vision_layers": 1, "vision_heads": 2,
       "text_hidden": 32, "text_layers": 1, "text_heads": 2, "text_intermediate": 64, "max_length": 128}


def gpu_pipeline_config(path: Path) -> Path:
    """examples/tiny.yaml with a quarter of a GPU for every stage kind, written to `path` (validated here)."""
    from flows.config import load_config

    config = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    config["resources"] = {group: {"num_cpus": 1, "num_gpus": GPU_SHARE} for group in GROUPS}
    path.write_text(yaml.safe_dump(config))
    load_config(path)
    return path


def pipeline_on_cuda(scratch: Path) -> dict[str, Any]:
    """The tiny stream on CUDA as one `many run` command: wall seconds and compute seconds per stage kind."""
    from benchmarks.cold import analyse, cold_run

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    store = scratch / "store-gpu"
    summary, wall, cpu = cold_run(gpu_pipeline_config(scratch / "tiny-gpu.yaml"), store, env)
    analysis = analyse(str(store), summary, cores=1)
    return {"wall_s": wall, "cpu_s": cpu, "stages": analysis["stages"], "kinds": analysis["kinds"],
            "nodes": sorted({s["node"] for s in summary["stages"]})}


def lora_step_rates(shape: dict[str, int], device: str, dtype_name: str, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """Steps/s of many.training.finetune and of a bare PEFT loop on one randomly initialised LLaVA of `shape`."""
    import torch

    from benchmarks.train_overhead import VOCAB, finetune_rate, synthetic_samples
    from many.config import FinetuneConfig, TinyModelConfig
    from many.model.tiny import build_tiny_llava

    dtype = getattr(torch, dtype_name)
    cfg = TinyModelConfig(**shape)
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model, processor = build_tiny_llava(cfg, VOCAB, seed=0)
    finally:
        torch.set_default_dtype(previous)
    model = model.eval().requires_grad_(False)
    build_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    samples = synthetic_samples(batch * 4, cfg.image_size)
    finetune_cfg = FinetuneConfig(steps=steps, batch_size=batch, warmup_steps=1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    many_rates, bare_rates = [], []
    for _ in range(repeats):
        many_rates.append(finetune_rate(model, processor, samples, finetune_cfg))
        bare_rates.append(bare_loop_rate(model, processor, samples, finetune_cfg, dtype))
        if device == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    many_rate, bare = statistics.median(many_rates), statistics.median(bare_rates)
    return {"shape": shape, "device": device, "dtype": dtype_name, "parameters": parameters, "batch": batch,
            "steps": steps, "repeats": repeats, "build_s": build_s, "many_steps_per_s": many_rate,
            "bare_steps_per_s": bare, "ratio": many_rate / bare, "goal_ratio": GOAL_RATIO, "peak_gib": peak,
            "many_rates": many_rates, "bare_rates": bare_rates}


def bare_loop_rate(model, processor, samples, cfg, dtype) -> float:
    """benchmarks.train_overhead's bare loop, under the same autocast as many's loop when the base is half precision."""
    import torch

    from benchmarks.train_overhead import bare_rate

    half = dtype in (torch.bfloat16, torch.float16)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype, enabled=half):
        return bare_rate(model, processor, samples, cfg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy shapes, no pipeline run")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run (7B)")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (7B)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating (many, bare) rounds")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or --smoke for the CPU toy-shape check", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="many-bench-gpu-"))
    quiet_environment(scratch)
    if args.smoke:
        torch.set_num_threads(1)
        gpu_pipeline_config(scratch / "tiny-gpu.yaml")  # the pipeline part's config still validates
        pipeline = None
        step = lora_step_rates(TOY, "cpu", "float32", batch=2, steps=3, repeats=1)
    else:
        print("  tiny pipeline on CUDA …", file=sys.stderr, flush=True)
        pipeline = pipeline_on_cuda(scratch)
        print("  7B-shaped LoRA step, bf16 …", file=sys.stderr, flush=True)
        step = lora_step_rates(SEVEN_B, "cuda", "bfloat16", args.batch, args.steps, args.repeats)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU (smoke)"
    print(f"Device: {device}; torch {torch.__version__}.\n")
    if pipeline:
        print(f"Tiny pipeline (examples/tiny.yaml, every stage kind on the GPU, {GPU_SHARE:g} GPU each): cold `many run` wall "
              f"{pipeline['wall_s']:.0f} s, {pipeline['stages']} stages computed on {', '.join(pipeline['nodes'])}.\n")
        print("| stage kind | stages | compute s |\n|---|---:|---:|")
        for kind, k in pipeline["kinds"].items():
            print(f"| {kind} | {k['n']} | {k['sum']:.1f} |")
        print()
    else:
        print("Tiny pipeline on CUDA: not run (smoke; its config validated).\n")
    shape = "7B-shaped" if not args.smoke else "toy-shaped"
    print(f"LoRA fine-tuning step, {shape} LLaVA ({step['parameters'] / 1e9:.2f} B parameters, {step['dtype']}, "
          f"batch {step['batch']}, {step['steps']} steps × {step['repeats']} alternating rounds; built in "
          f"{step['build_s']:.0f} s" + (f", peak {step['peak_gib']:.1f} GiB" if step["peak_gib"] else "") + "):\n")
    print("| loop | steps/s |\n|---|---:|")
    print(f"| many.training.finetune | {step['many_steps_per_s']:.3f} |\n| bare PEFT loop | {step['bare_steps_per_s']:.3f} |\n")
    met = step["ratio"] >= GOAL_RATIO
    print("| goal | measured | target | met |\n|---|---|---|---|")
    print(f"| many / bare PEFT steps/s ({shape}, {step['dtype']}) | {step['ratio']:.3f} | ≥ {GOAL_RATIO} | "
          f"{'met' if met else 'missed'}{' (smoke: not judged)' if args.smoke else ''} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "pipeline": pipeline, "lora_step": step}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
