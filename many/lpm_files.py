"""The LPM state files (docs/design.md §1 LPM, §2 merge[t]): how a merge state (many.lpm.LayerState per layer) is stored
between tasks, read back, and listed.

An input group is the set of LoRA layers that read one input (q/k/v after one norm, gate/up after another, o and
down alone): they share one Gram G_t, hence one C_t = γI + Σ G̃_i and one γ. The Grams file of the stats stage
names the groups (many.stats); the state keeps that grouping:

    <state>/<group key>.safetensors   one file per input group (group key = its first layer's PEFT name):
        "C" (in, in) in LPMConfig.state_dtype, "gamma", "tasks", and per layer either (thin) "B.<layer>" (out, Σr)
        and "AG.<layer>" (Σr, in), or (dense) "R.<layer>" (in, out), float64;
        metadata {"lpm_group": JSON {"format": "many.lpm.group/2", "layers": [layer names], "ranks": {layer: Σr}}}

A layer's R is stored only once its state is dense (Σr·(in + out) ≥ in·out, many.lpm.dense_is_smaller), so a file
holds min(thin, dense) numbers per layer besides C. At LLaVA-1.5-7B shapes a block's state is 3 C's of 4096² and one
of 11008², plus each layer's B and AG or R. A float32 C halves C but rounds the running sum once per task (the merge
itself stays float64). The layer names, γ and each layer's Σr and form are read from a file's header and metadata
without loading its matrices.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from many import lpm_checks as checks
from many.lpm import LayerState

GROUP_FORMAT = "many.lpm.group/2"  # /2: dense layers (R), Σr per layer in the metadata  # "format" in the safetensors metadata of a stored group state
STATE_SUFFIX = ".safetensors"  # a state directory holds "<group key>.safetensors" per input group
_METADATA_KEY = "lpm_group"
_SCALARS = ("gamma", "tasks")


# -- one group: tensors and metadata ---------------------------------------------------------------------------------


def group_tensors(
    states: Mapping[str, LayerState], c_dtype: torch.dtype = torch.float64
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A group's states as (named tensors, string metadata) for one safetensors file, C stored once:

        "C" (in, in) in `c_dtype`, "gamma" and "tasks" 0-d; per layer "B.<layer>" (out, Σr) and "AG.<layer>" (Σr, in)
        (thin) or "R.<layer>" (in, out) (dense), float64;
        metadata {"lpm_group": JSON {"format": GROUP_FORMAT, "layers": [layer names], "ranks": {layer: Σr}}}.
    """
    first = checks.shared(states, "<group>")
    tensors = {
        "C": first.C.to(c_dtype).contiguous(),
        "gamma": torch.tensor(first.gamma, dtype=torch.float64),
        "tasks": torch.tensor(first.tasks, dtype=torch.int64),
    }
    for name, state in states.items():
        if state.R is not None:
            tensors[f"R.{name}"] = state.R.contiguous()
        else:
            tensors[f"B.{name}"] = state.B.contiguous()
            tensors[f"AG.{name}"] = state.AG.contiguous()
    ranks = {name: state.rank for name, state in states.items()}
    # One metadata key: safetensors writes several in a random order, and stored bytes must not vary between runs.
    return tensors, {_METADATA_KEY: json.dumps({"format": GROUP_FORMAT, "layers": list(states), "ranks": ranks})}


def _stored(metadata: Mapping[str, str] | None, group: str) -> dict:
    try:
        stored = json.loads((metadata or {})[_METADATA_KEY])
    except (KeyError, TypeError, ValueError):
        stored = {}
    if not isinstance(stored, dict) or stored.get("format") != GROUP_FORMAT:
        raise checks.fail(
            group,
            f"not an LPM group state (no {_METADATA_KEY!r} metadata of format {GROUP_FORMAT!r}); it was written by "
            "an older version: recompute the merge",
        )
    return stored


def group_layers(metadata: Mapping[str, str] | None, group: str = "<state>") -> list[str]:
    """The layer names of a stored group, from its safetensors metadata (no tensor is read)."""
    return list(group_ranks(metadata, group))


def group_ranks(metadata: Mapping[str, str] | None, group: str = "<state>") -> dict[str, int]:
    """{layer: Σr} of a stored group in its layer order, from its safetensors metadata (no tensor is read)."""
    stored = _stored(metadata, group)
    layers, ranks = stored.get("layers"), stored.get("ranks")
    if not isinstance(layers, list) or not layers or not all(isinstance(name, str) for name in layers):
        raise checks.fail(group, f"the state's metadata 'layers' must be a non-empty list of names, got {layers!r}")
    if not isinstance(ranks, dict) or set(ranks) != set(layers) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks.values()):
        raise checks.fail(group, f"the state's metadata 'ranks' must give each layer's Σr ≥ 1, got {ranks!r}")
    return {name: ranks[name] for name in layers}


def group_from_tensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None, group: str = "<state>"
) -> dict[str, LayerState]:
    """Inverse of `group_tensors`: {layer: LayerState}, all sharing one float64 C; checks keys, shapes, finiteness."""
    ranks = group_ranks(metadata, group)
    layers = list(ranks)
    expected = {"C", *_SCALARS}
    for name in layers:
        expected |= {f"R.{name}"} if f"R.{name}" in tensors else {f"B.{name}", f"AG.{name}"}
    if set(tensors) != expected:
        raise checks.fail(group, f"state tensors must have keys {sorted(expected)}, got {sorted(tensors)}")
    for name in _SCALARS:
        if tensors[name].numel() != 1:
            raise checks.fail(group, f"state tensor {name!r} must be a scalar, got shape {tuple(tensors[name].shape)}")
    C = checks.matrix(tensors["C"], "C", group)
    gamma, tasks = float(tensors["gamma"].item()), int(tensors["tasks"].item())
    states = {}
    for name in layers:
        try:
            if f"R.{name}" in tensors:
                R = checks.matrix(tensors[f"R.{name}"], "R", name)
                states[name] = LayerState(C=C, R=R, dense_rank=ranks[name], gamma=gamma, tasks=tasks)
            else:
                B = checks.matrix(tensors[f"B.{name}"], "B", name)
                AG = checks.matrix(tensors[f"AG.{name}"], "AG", name)
                if B.shape[1] != ranks[name]:
                    raise ValueError(f"B holds Σr = {B.shape[1]} columns but the metadata says {ranks[name]}")
                states[name] = LayerState(C=C, B=B, AG=AG, gamma=gamma, tasks=tasks)
        except ValueError as error:
            raise checks.fail(name, str(error)) from None
    return states


# -- the files of a state directory ----------------------------------------------------------------------------------


def state_file(state_dir: Path, group: str) -> Path:
    """Where the state of the input group `group` (its first layer's PEFT name) lives in a state directory."""
    return Path(state_dir) / f"{group}{STATE_SUFFIX}"


def save_group(states: Mapping[str, LayerState], path: Path, c_dtype: str = "float64") -> Path:
    """One input group's RLS states ({layer: LayerState} sharing one C) as a safetensors file, C in `c_dtype`."""
    tensors, metadata = group_tensors(states, getattr(torch, c_dtype))
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_group(path: Path, group: str | None = None) -> dict[str, LayerState]:
    """{layer: LayerState} of one state file; the layers share one float64 C."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return group_from_tensors(tensors, metadata, group or Path(path).name.removesuffix(STATE_SUFFIX))


def state_files(state_dir: Path) -> list[Path]:
    return sorted(Path(state_dir).glob(f"*{STATE_SUFFIX}"))


def state_modules(state_dir: Path) -> dict[str, Path]:
    """{PEFT module name: its group's state file} of a merge state directory (headers only are read)."""
    modules = {}
    for path in state_files(state_dir):
        with safe_open(str(path), framework="pt") as f:
            modules |= dict.fromkeys(group_layers(f.metadata(), str(path)), path)
    return modules


def state_gammas(state_dir: Path) -> dict[str, float]:
    """Each layer's ridge γ (shared by its group), read without loading the matrices (for `many export`)."""
    gammas = {}
    for path in state_files(state_dir):
        with safe_open(str(path), framework="pt") as f:
            gammas |= dict.fromkeys(group_layers(f.metadata(), str(path)), float(f.get_tensor("gamma").item()))
    return gammas


def state_ranks(path: Path, layers: Iterable[str]) -> dict[str, int]:
    """Σr so far of each of `layers` in one state file, from its metadata."""
    with safe_open(str(path), framework="pt") as f:
        ranks = group_ranks(f.metadata(), str(path))
    return {layer: ranks[layer] for layer in layers}


def state_forms(path: Path) -> dict[str, str]:
    """{layer: "thin" | "dense"} of one state file, from its header (a dense layer stores R.<layer>)."""
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        return {layer: "dense" if f"R.{layer}" in keys else "thin" for layer in group_layers(f.metadata(), str(path))}
