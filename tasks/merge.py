"""The merge[t] stage's work (docs/design.md §1 LPM, §2): fold task t into the RLS state of tasks < t, one input group
at a time, and export the merge as a PEFT adapter. many.lpm does the math, many.lpm_files the state files
(one per input group: C once, B and AG or R per layer), many.lpm_checks what they accept; this module plans the
per-group jobs, runs them, and writes the stage's outputs.

Each group is one job (`merge_group`): read the group's Gram and previous state file, absorb, export the LoRA
factors (exact: rank Σr from a thin state, M_t against an identity from a dense one; or truncated to lpm.rank by
SVD, its error measured), write the new state file and a small factors file, free. The stage's `export` output,
export.json, says per layer which form the state is in, Σr, the exported rank and the relative error of the
exported update ‖M_t − B_m A_m‖_F / ‖M_t‖_F (0 when exact). Inside Ray (the stage's worker), the jobs fan
out as Ray tasks of 1 CPU each, pinned to THIS node (the stage's inputs and workdir are local files here, so the
fan-out is within the node that holds them). Each also asks for its working set as Ray's `memory` resource
(`job_bytes`), so Ray runs as many at once as the node has free CPUs *and* memory for: peak memory is bounded by
the node's `memory` resource (at least one group's working set), never the model's. Outside Ray the same jobs run
one after another.
Every job runs with one torch thread either way, so the bytes written do not depend on how the stage ran.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from many.config import LPMConfig
from tasks.runtime import ray_get

if TYPE_CHECKING:
    from torch import Tensor

EXPORT_FORMAT = "many.lpm.export/1"  # "format" of merge[t]'s export.json


# -- planning: which layers form a job, checked on names only ------------------------------------------------------


@dataclass(frozen=True)
class GroupJob:
    """One input group's merge: its Gram (the Grams file's tensor `group`), its layers, its previous state file."""

    group: str
    layers: tuple[str, ...]
    previous: Path | None


def plan_groups(layers: list[str], gram_groups: Mapping[str, str], previous: Mapping[str, Path] | None) -> list[GroupJob]:
    """The jobs of one merge step: the task's LoRA `layers` grouped as the Grams file groups them ({layer: group key}),
    each with the one previous state file that holds exactly its layers (`previous`: {layer: its file}, the
    many.lpm_files.state_modules of the previous state dir). Raises ValueError naming what differs; the layer names
    are checked as many.lpm.absorb_model checks them (many.lpm_checks.model_layers)."""
    from many import lpm_checks

    lpm_checks.model_layers(layers, gram_groups, previous)
    members: dict[str, list[str]] = {}
    for layer in layers:
        members.setdefault(gram_groups[layer], []).append(layer)
    jobs = []
    for group, names in members.items():
        before = None
        if previous is not None:
            files = {previous[name] for name in names}
            before = files.pop() if len(files) == 1 else None
            if before is None or {layer for layer, file in previous.items() if file == before} != set(names):
                raise ValueError(
                    f"LPM: the Grams group {group!r} holds layers {names} but the previous merge state groups them "
                    "differently; recompute the merge chain from its first task with these Grams"
                )
        jobs.append(GroupJob(group, tuple(names), before))
    return jobs


# -- one job -------------------------------------------------------------------------------------------------------


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread for the duration: every job computes the same bits on a Ray worker or in the caller."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_loras(adapter_file: str, scales: Mapping[str, float]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{layer: (lora_B (out, r), lora_A (r, in), scale)} of the group's layers only (the adapter is checked by the caller)."""
    from safetensors import safe_open

    with safe_open(adapter_file, framework="pt") as f:
        return {
            layer: (f.get_tensor(f"{layer}.lora_B.weight"), f.get_tensor(f"{layer}.lora_A.weight"), scale)
            for layer, scale in scales.items()
        }


def task_gram(grams_file: str, answer_file: str | None, group: str, weight: float) -> Tensor:
    """The Gram task t is merged with, G_t = G_all,t + λ_t·G_answer,t (in, in) (LPMConfig.answer; docs/design.md §1):
    the all-token Gram as stored when λ_t = 0, else the sum in float64."""
    from safetensors import safe_open

    with safe_open(grams_file, framework="pt") as grams:
        gram = grams.get_tensor(group)  # (in, in) float32
    if not weight:
        return gram
    if answer_file is None:
        raise ValueError(f"LPM: lpm.answer weight {weight} needs the task's answer Grams (the stats stage's "
                         "answer_grams); the merge got none")
    with safe_open(answer_file, framework="pt") as answers:
        return gram.double() + weight * answers.get_tensor(group).double()


def merge_group(
    job: GroupJob, scales: Mapping[str, float], adapter_file: str, grams_file: str, answer_file: str | None,
    state_file: str, factors_file: str, config: LPMConfig,
) -> tuple[str, dict[str, dict]]:
    """One input group's step t (many.lpm.absorb_group, export_group): C_t = C_{t−1} + G̃_t; per layer B_t = [B_{t−1} |
    s_t B_t], AG_t = [AG_{t−1}; A_t G̃_t] (thin) or R_t = R_{t−1} + (A_t G̃_t)ᵀ(s_t B_t)ᵀ (dense); the merged LoRA per layer,
    exact or truncated to config.rank. G_t = G_all,t + λ_t·G_answer,t (`task_gram`, λ_t = config.answer.weight).

    Writes the group's new state to `state_file` and the merged factors (float32, PEFT key names) to `factors_file`;
    returns `factors_file` and {layer: export record} (`_export_record`). Peak memory: `job_bytes`.
    """
    from safetensors.torch import save_file

    from many.lpm import absorb_group, export_group, truncate
    from many.lpm_files import load_group, save_group

    with _one_thread():
        loras = _read_loras(adapter_file, scales)
        gram = task_gram(grams_file, answer_file, job.group, config.answer.weight)  # (in, in)
        before = None if job.previous is None else load_group(job.previous, job.group)
        states = absorb_group(before, loras, gram, config, job.group)
        del before, gram, loras
        exported = export_group(states, job.group)
        save_group(states, Path(state_file), config.state_dtype)
        records = {layer: {"form": state.form, "rank": state.rank, "gamma": state.gamma} for layer, state in states.items()}
        del states
        factors = {}
        for layer, (merged_B, merged_A) in exported.items():
            error = 0.0
            if config.rank is not None:
                merged_B, merged_A, error = truncate(merged_B, merged_A, config.rank, layer)
            records[layer] |= {"exported_rank": merged_B.shape[1], "error": error}
            factors[f"{layer}.lora_B.weight"] = merged_B.float().contiguous()
            factors[f"{layer}.lora_A.weight"] = merged_A.float().contiguous()
        save_file(factors, factors_file)
    return factors_file, records


def job_bytes(job: GroupJob, adapter_file: str, grams_file: str, form: str = "auto", answer: bool = False) -> int:
    """`merge_group`'s peak working set in bytes, from file headers only: three in×in float64 matrices (previous
    C, G̃, new C or its factor; four with an answer Gram added to G, `answer`) plus, per layer in float64, the thin
    B (out, Σr) and AG (Σr, in) old and new while
    the layer stays thin, else its R (in, out) old and new, the exported M_t (out, in) and its identity
    (min(in, out)², many.lpm.export_group) — the previous thin factors instead of the old R at the switch.
    `form`: LPMConfig.state_form."""
    from safetensors import safe_open

    from many.lpm import dense_is_smaller
    from many.lpm_files import state_forms, state_ranks

    with safe_open(grams_file, framework="pt") as grams:
        n_in = grams.get_slice(job.group).get_shape()[0]
    with safe_open(adapter_file, framework="pt") as adapter:
        thin = {layer: adapter.get_slice(f"{layer}.lora_B.weight").get_shape() for layer in job.layers}  # (out, r)
    before = {} if job.previous is None else state_ranks(job.previous, job.layers)  # Σr so far
    forms = {} if job.previous is None else state_forms(job.previous)
    total = (4 if answer else 3) * n_in * n_in
    for layer, (out, r) in thin.items():
        rank = before.get(layer, 0) + r  # Σr after this task
        was_dense = forms.get(layer) == "dense"
        if not was_dense and (form == "thin" or (form == "auto" and not dense_is_smaller(rank, n_in, out))):
            total += 2 * (out + n_in) * rank
            continue
        old = n_in * out if was_dense else (out + n_in) * rank  # R_{t−1}, or the thin factors it is formed from
        total += old + 2 * n_in * out + min(n_in, out) ** 2
    return 8 * total


# -- running the jobs ----------------------------------------------------------------------------------------------


def _in_ray() -> bool:
    """Whether this process is connected to Ray (a stage's worker is); never imports ray itself."""
    ray = sys.modules.get("ray")
    return ray is not None and getattr(ray, "is_initialized", lambda: False)()


_remote_merge_group = None


def _node_memory(node_id: str) -> float:
    """The `memory` resource (bytes) Ray gives the node `node_id`: what its tasks may reserve in all."""
    import ray

    return next(node["Resources"].get("memory", 0.0) for node in ray.nodes() if node["NodeID"] == node_id)


def _on_this_node(calls: list[tuple]) -> list[tuple[str, dict[str, dict]]]:
    """`merge_group(*args)` for each of `calls` as Ray tasks of 1 CPU and their `job_bytes` of Ray's `memory`
    resource (capped at the node's, so that the largest job still runs: alone), all on the node this process runs
    on (the files they read and write are local here)."""
    global _remote_merge_group
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if _remote_merge_group is None:
        _remote_merge_group = ray.remote(merge_group)
    node = ray.get_runtime_context().get_node_id()
    here = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    ceiling = _node_memory(node)
    refs = []
    for args in calls:
        job, _, adapter_file, grams_file, answer_file = args[:5]  # merge_group's first parameters
        needs = job_bytes(job, adapter_file, grams_file, args[-1].state_form, answer_file is not None)
        memory = int(min(needs, ceiling))
        refs.append(_remote_merge_group.options(num_cpus=1, memory=memory, max_retries=0, scheduling_strategy=here)
                    .remote(*args))
    return ray_get(refs)


def run_jobs(calls: list[tuple], fan_out: bool | None = None) -> list[tuple[str, dict[str, dict]]]:
    """`merge_group(*args)` for every call: fanned out over Ray on this node when connected to Ray (or `fan_out`),
    else one after another in this process. Same results, same bytes."""
    if fan_out if fan_out is not None else _in_ray():
        return _on_this_node(calls)
    return [merge_group(*args) for args in calls]


def merge_step(inputs: Mapping[str, Path], workdir: Path, config: LPMConfig, fan_out: bool | None = None) -> dict[str, Path]:
    """merge[t] from local inputs "finetune" (task dir with adapter/), "grams" (the stats file), "answer_grams" (the
    stats stage's answer Grams; needed when config.answer.weight > 0) and, for t > 1, "previous" (merge[t−1]'s state
    dir): {"state": state dir, "adapter": merged PEFT adapter dir, "export": export.json} under `workdir`. `config` is
    the task's (LPMConfig.for_task: its λ resolved). export.json (EXPORT_FORMAT): {"format", "rank": lpm.rank,
    "layers": {layer: {"form": "thin" | "dense", "rank": Σr, "gamma": γ, "exported_rank", "error": ‖M_t − B_m A_m‖_F /
    ‖M_t‖_F}}}, layers in the adapter's order."""
    from safetensors.torch import load_file

    from many.adapters import ADAPTER_DIR, WEIGHTS_FILE, lora_factors, read_adapter_config, write_lora_adapter
    from many.lpm_files import state_file, state_modules
    from many.stats import read_gram_groups

    adapter_dir = inputs["finetune"] / ADAPTER_DIR
    scales = {layer: scale for layer, (_, _, scale) in lora_factors(adapter_dir).items()}  # validates the adapter
    if config.answer.tasks:
        raise ValueError("merge_step: lpm.answer names per-task weights; pass the task's config (LPMConfig.for_task)")
    answer = inputs.get("answer_grams") if config.answer.weight else None
    groups = read_gram_groups(inputs["grams"])
    if answer is not None and read_gram_groups(answer) != groups:
        raise ValueError("LPM: the answer Grams group the LoRA layers differently from the all-token Grams; "
                         "recompute the task's stats stage")
    previous = state_modules(inputs["previous"]) if "previous" in inputs else None
    jobs = plan_groups(list(scales), groups, previous)
    state_dir, factors_dir = workdir / "state", workdir / "factors"
    state_dir.mkdir()
    factors_dir.mkdir()
    calls = [
        (job, {layer: scales[layer] for layer in job.layers}, str(adapter_dir / WEIGHTS_FILE), str(inputs["grams"]),
         None if answer is None else str(answer), str(state_file(state_dir, job.group)),
         str(factors_dir / f"{job.group}.safetensors"), config)
        for job in jobs
    ]
    merged: dict[str, Tensor] = {}
    records: dict[str, dict] = {}
    for path, group_records in run_jobs(calls, fan_out):
        merged |= load_file(path)
        records |= group_records
    factors = {layer: (merged[f"{layer}.lora_B.weight"], merged[f"{layer}.lora_A.weight"]) for layer in scales}
    write_lora_adapter(factors, read_adapter_config(adapter_dir), workdir / "adapter")
    shutil.rmtree(factors_dir)
    export = workdir / "export.json"
    export.write_text(json.dumps({"format": EXPORT_FORMAT, "rank": config.rank,
                                  "layers": {layer: records[layer] for layer in scales}}, indent=1, allow_nan=False) + "\n")
    return {"state": state_dir, "adapter": workdir / "adapter", "export": export}


__all__: list[str] = [
    "EXPORT_FORMAT", "GroupJob", "job_bytes", "merge_group", "merge_step", "plan_groups", "run_jobs", "task_gram",
]
