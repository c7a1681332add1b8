"""Run the benchmarks and regenerate BENCHMARKS.md from their printed tables (`make bench`).

Each benchmark module exposes `main(argv)` and prints its own markdown; this script captures that output
verbatim under a heading naming the exact command, so every number in BENCHMARKS.md comes from a rerunnable
script; hand-written commentary on a section lives in docs/benchmarks/notes/<name>.md and is appended under
it. `--smoke` runs the tiny sizes only and writes nothing (the test suite uses it so scripts cannot rot).
`--only NAME…` reruns just those benchmarks and replaces their sections of an existing BENCHMARKS.md, keeping
the others (the full quality run takes hours on two cores: run it alone); `--args NAME="…"` overrides a
benchmark's arguments, e.g. `--only quality --args quality="--seeds 1 --orders ucit"`. Quality and ablation get
one `--store` unless given their own, so the ablation reads quality's runs instead of computing them again.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import platform
import re
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

# (module, title, argv for the full run)
BENCHMARKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("benchmarks.quality", "Quality: every method on mini-UCIT through the pipeline (issue #8)", ()),
    ("benchmarks.quality_stress", "Quality on examples/stress.yaml: the same table with rank-8 LoRAs (issue #16)", ()),
    ("benchmarks.ablation", "Where MAny's gap to the oracle comes from: its final model taken apart (issue #8)", ()),
    ("benchmarks.fwd_prompt_sweep", "Can Fwd-Prompt's prompt tuning learn a mini-UCIT task? (issue #16)",
     ("--tasks", "noisy-caption,style-cls", "--lrs", "0.1,1", "--prompts", "8,32", "--steps", "200", "--n-test", "50",
      "--no-unprojected")),
    ("benchmarks.miniature", "Is MAny's gap the method or the miniature? LoRA rank × hidden size (issue #16)",
     ("--lrs", "1e-3,5e-4", "--plot", "docs/benchmarks/miniature.png")),
    ("benchmarks.perf", "Performance goals as ratios, 100-task stream, 7B-shaped merge (issue #8)", ()),
    ("benchmarks.merge_bounds", "Merge state bounded by the dense form, store growth, 7B on 3 nodes (issue #17)", ()),
    ("benchmarks.merge_cost", "LPM merge cost vs a bare solve, and vs the dense RLS step (issue: foundation, #17)", ()),
    ("benchmarks.store_overhead", "Store overhead vs a plain fsspec copy (issue: store)", ()),
    ("benchmarks.train_overhead", "Training-loop overhead vs a bare PyTorch loop (issue: model/training)", ()),
    ("benchmarks.cluster", "Tiny pipeline: 1 node vs a simulated 3-node cluster (issue #7)", ()),
    ("benchmarks.reliability", "Reliability suite: faults, bad inputs, security (issue #9)", ()),
    ("benchmarks.issue17", "Issue #17: fast cold run, cheap store, free cached rerun, GPU", ()),
) + ((("benchmarks.gpu", "GPU: tiny pipeline on CUDA, 7B-shaped LoRA step vs bare PEFT (issue #17)", ()),)
     if torch.cuda.is_available() else ())  # benchmarks.gpu refuses without CUDA: registered only where it can run
SHARED_STORE = ("quality", "ablation")  # ablation takes quality's runs apart: given one store, it recomputes no stage
NOTES = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "notes"  # <name>.md: commentary kept under a section
HEADING = re.compile(r"^## ", re.MULTILINE)


def run(module: str, argv: list[str]) -> tuple[str, float]:
    """Import `module`, call its main(argv) and return what it printed and the seconds it took."""
    buffer = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        importlib.import_module(module).main(argv)
    return buffer.getvalue(), time.perf_counter() - start


def short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def sections_of(text: str) -> dict[str, str]:
    """{module short name: section text} of an existing BENCHMARKS.md (sections start with "## ", name the command)."""
    found = {}
    for chunk in HEADING.split(text)[1:]:
        match = re.search(r"`python -m benchmarks\.(\w+)", chunk)
        if match:
            found[match.group(1)] = "## " + chunk.rstrip() + "\n"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no BENCHMARKS.md")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--only", nargs="*", help="benchmark names to run (default: all), e.g. quality perf")
    parser.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"', help="arguments for one benchmark")
    args = parser.parse_args(argv)
    names = [short(m) for m, _, _ in BENCHMARKS]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"--only {unknown}: unknown benchmarks; choose from {', '.join(names)}")
    overrides = {}
    for item in args.args:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            parser.error(f"--args {item!r}: use NAME=\"ARGS\" with NAME one of {', '.join(names)}")
        overrides[name] = shlex.split(value)
    selected = [b for b in BENCHMARKS if not args.only or short(b[0]) in args.only]
    sections = {}
    shared_store = tempfile.mkdtemp(prefix="many-bench-store-")
    for module, title, extra in selected:
        bench_argv = ["--smoke"] if args.smoke else overrides.get(short(module), list(extra))
        if short(module) in SHARED_STORE and "--store" not in bench_argv:
            bench_argv += ["--store", shared_store]
        print(f"running {module} {' '.join(bench_argv)}", file=sys.stderr)
        output, seconds = run(module, bench_argv)
        print(output)
        command = f"python -m {module} {shlex.join(bench_argv)}".rstrip()
        notes = NOTES / f"{short(module)}.md"
        commentary = f"\n{notes.read_text().strip()}\n" if notes.exists() else ""
        sections[short(module)] = f"## {title}\n\n`{command}` ({seconds:.0f} s)\n\n{output.strip()}\n{commentary}"
    if args.smoke:
        return 0
    kept = sections_of(args.out.read_text()) if args.only and args.out.exists() else {}
    header = (
        "# Benchmarks\n\n"
        f"Regenerated by `make bench` (sections rerun on their own with `python -m benchmarks.all --only NAME`); last "
        f"run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}. "
        "Timing claims are ratios measured side by side in one run (the machine is shared and noisy).\n"
    )
    body = [sections.get(name) or kept.get(name) for name in names]
    args.out.write_text("\n".join([header, *(s for s in body if s)]))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
