"""Synthetic merge streams (issue #8 perf): random LoRAs and Grams of a given model shape pushed through the real
`merge` stage (tasks.rows.many.compute_merge under tasks.cache.run_stage) and the real store, no training.

A task is a PEFT adapter dir (write_lora_adapter) and a Grams file (save_grams, float32, one Gram per input group
as the stats stage writes it), both put into the store as the finetune and stats stages would. Grams are XᵀX/N of
N random tokens plus a small diagonal, so they are symmetric positive definite like real ones; layers fed by the
same input (q/k/v, gate/up) share one Gram, as in a Llama block.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from many.adapters import write_lora_adapter
from many.config import AnswerWeightConfig, LPMConfig
from many.stats import save_grams
from tasks.cache import run_stage
from tasks.catalog import recomputable_outputs, stage_def
from tasks.rows.many import compute_merge
from tasks.store import BlobRef, Manifest, Store

PREFIX = "base_model.model.model.language_model.layers"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# The LPM step these benchmarks time: the all-token merge (λ = 0): write_task writes no answer Grams. The default
# merge also reads one answer Gram per input group and adds it (LPMConfig.answer): one more in×in read and sum.
ALL_TOKENS = LPMConfig(answer=AnswerWeightConfig(weight=0.0))


@dataclass(frozen=True)
class Shape:
    """A Llama decoder's LoRA-targeted layers: `layers` blocks of hidden×hidden attention and hidden↔intermediate MLP."""

    layers: int
    hidden: int
    intermediate: int
    rank: int = 8

    def modules(self) -> dict[str, tuple[int, int, str]]:
        """{PEFT module name: (out, in, Gram group)}; modules of one group read the same input."""
        out: dict[str, tuple[int, int, str]] = {}
        for i in range(self.layers):
            block = f"{PREFIX}.{i}"
            for name in ATTENTION:
                group = f"{block}.o" if name == "o_proj" else f"{block}.qkv"
                out[f"{block}.self_attn.{name}"] = (self.hidden, self.hidden, group)
            out[f"{block}.mlp.gate_proj"] = (self.intermediate, self.hidden, f"{block}.gate_up")
            out[f"{block}.mlp.up_proj"] = (self.intermediate, self.hidden, f"{block}.gate_up")
            out[f"{block}.mlp.down_proj"] = (self.hidden, self.intermediate, f"{block}.down")
        return out

    def gram_bytes(self, shared: bool) -> int:
        """float32 bytes of one task's Grams: one per module (the stats stage's format) or one per input group."""
        modules = self.modules()
        sizes = {group if shared else name: n_in * n_in * 4 for name, (_, n_in, group) in modules.items()}
        return sum(sizes.values())


def adapter_config(shape: Shape) -> dict:
    return {
        "peft_type": "LORA", "r": shape.rank, "lora_alpha": 2 * shape.rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        "task_type": None, "base_model_name_or_path": None,
    }


def write_task(shape: Shape, seed: int, out: Path, tokens: int = 256) -> tuple[Path, Path]:
    """One synthetic task: (dir holding adapter/, Grams file) under `out`."""
    generator = torch.Generator().manual_seed(seed)
    grams: dict[str, torch.Tensor] = {}
    by_group: dict[str, torch.Tensor] = {}
    factors = {}
    for name, (n_out, n_in, group) in shape.modules().items():
        if group not in by_group:
            x = torch.randn(tokens, n_in, generator=generator)
            gram = x.T @ x / tokens
            gram.diagonal().add_(1e-2)
            by_group[group] = gram
        grams[name] = by_group[group]
        factors[name] = (torch.randn(n_out, shape.rank, generator=generator) * 0.02,
                         torch.randn(shape.rank, n_in, generator=generator) / n_in**0.5)
    task_dir = out / f"task-{seed}"
    write_lora_adapter(factors, adapter_config(shape), task_dir / "adapter")
    gram_path = save_grams(grams, out / f"grams-{seed}.safetensors")  # one tensor object per group: stored once
    return task_dir, gram_path


def rss(tree: bool = False) -> int:
    """Resident set size of this process, or of it and all its descendants (a local Ray's raylet, GCS and workers
    are: the merge's memory lives in Ray worker processes). The tree's sum counts shared pages once per process."""
    process = psutil.Process()
    total = process.memory_info().rss
    if tree:
        for child in process.children(recursive=True):
            with suppress(psutil.Error):
                total += child.memory_info().rss
    return total


@contextmanager
def peak_rss(interval: float = 0.01, tree: bool = False) -> Iterator[dict[str, int]]:
    """Sample `rss(tree)` every `interval` s; yields a dict whose "peak" is set on exit."""
    result, done = {"peak": 0}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            result["peak"] = max(result["peak"], rss(tree))
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak"] = max(result["peak"], rss(tree))


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@dataclass(frozen=True)
class Step:
    t: int
    seconds: float
    peak_rss: int  # of this process, or of its whole process tree when the stage ran on Ray
    store_bytes: int  # the whole store after the step
    state_bytes: int  # merge[t]'s state blob
    task_bytes: int  # task t's inputs as stored: adapter dir + Grams file
    added_bytes: int  # what the step added to the store: task t's inputs + merge[t]'s state and adapter
    cpu_seconds: float = 0.0  # this process's CPU time (user + system) during the step; in-process runs only


def _on_ray(store_url: str, config: LPMConfig) -> Callable[[dict[str, BlobRef]], Manifest]:
    """Run the merge stage as the pipeline does: `tasks.dispatch.execute` as a 1-CPU Ray task, which fans the input
    groups out over Ray on its node."""
    import ray

    from tasks.dispatch import execute
    from tasks.runtime import StoreSpec

    remote = ray.remote(execute).options(num_cpus=1, max_retries=0)

    def run(inputs: dict[str, BlobRef]) -> Manifest:
        result = ray.get(remote.remote(StoreSpec(store_url), "merge", config, inputs, 1, "cpu"))
        return Manifest.model_validate_json(result[1])  # (status, manifest JSON, seconds, node, …)

    return run


def merge_stream(store: Store, root: Path, shape: Shape, tasks: int, scratch: Path, config: LPMConfig = ALL_TOKENS,
                 report: Callable[[Step], None] = lambda step: None, on_ray: bool = False,
                 collect: bool = False) -> tuple[list[Step], Manifest]:
    """Tasks 1..`tasks` through the real merge stage into `store` (a local store at `root`), one after another;
    per step its time, peak RSS, the store's size, the state blob's size, the task's input bytes and what the step
    added to the store; and the last step's manifest.

    The task's inputs are written and put before the timer starts; the step is run_stage (materialise inputs,
    absorb + export, put outputs, write the manifest). `on_ray`: the stage runs as in the pipeline, as a Ray task
    (Ray must be connected, workers opening the store at `root`) whose input groups fan out over the node's CPUs,
    and the peak RSS is that of this process's whole tree (a local Ray's processes are its descendants); otherwise
    in this process, groups one after another. Each task's local files are deleted after its put. `collect`: after
    each step, a run summary lists the merge links so far and `gc --keep-last 1` runs (no grace period), collecting
    the superseded states (docs/design.md §3.4); the store's size is taken after it.
    """
    if on_ray:
        run = _on_ray(str(root), config)
    else:
        def run(inputs: dict[str, BlobRef]) -> Manifest:
            return run_stage(store, stage_def("merge", inputs), config, inputs,
                             lambda local, workdir: compute_merge(local, workdir, config=config, device="cpu")).manifest
    steps, previous, links = [], None, []
    for t in range(1, tasks + 1):
        before = tree_bytes(root)
        task_dir, gram_path = write_task(shape, seed=t, out=scratch)
        inputs: dict[str, BlobRef] = {"finetune": store.put(task_dir), "grams": store.put(gram_path)}
        task_bytes = tree_bytes(task_dir) + gram_path.stat().st_size
        shutil.rmtree(task_dir)
        gram_path.unlink()
        if previous is not None:
            inputs["previous"] = previous
        start, cpu = time.perf_counter(), time.process_time()
        with peak_rss(interval=0.05 if on_ray else 0.01, tree=on_ray) as peak:
            manifest = run(inputs)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        previous = manifest.outputs["state"]
        links.append(manifest)
        if collect:
            store.write_run("stream", {"run_id": "stream", "tasks": [f"task-{i}" for i in range(1, t + 1)],
                                       "stages": [{"stage": m.stage, "key": m.key} for m in links]})
            store.gc(delete=True, min_age_seconds=0, keep_last=1, recomputable=recomputable_outputs())
        total = tree_bytes(root)
        step = Step(t, seconds, peak["peak"], total, previous.size, task_bytes, total - before, cpu)
        report(step)
        steps.append(step)
    return steps, manifest
