"""A task's adapter on disk: the PEFT LoRA dir (read its factors, write merged factors back as one) and the task
directory around it (docs/design.md §1, §2 finetune[t], §5 export).

A task directory is `adapter/` (a PEFT LoRA adapter dir) plus `projector.safetensors` (the task's own vision→LLM
projector): `save_task` writes it, `load_task` and `projector_state` read it, `check_task_dir` checks a user-supplied
one against a base, `copy_task_dir` copies the files a run reads.

Task i's update of a targeted layer is ΔW_i = s_i · B_i A_i, B_i: (out, r), A_i: (r, in), s_i = lora_alpha / r
(lora_alpha / √r with rsLoRA; per-module r and alpha from rank_pattern / alpha_pattern). The merged LPM update is an
exact LoRA of rank Σ r_i with the scale folded into B, so it is written with lora_alpha = r (s = 1).
Module names are PEFT's, e.g. "base_model.model.model.language_model.layers.0.self_attn.q_proj" — the
safetensors key without ".lora_A.weight".
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from many.model.parts import PEFT_PREFIX, projector_of

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

ADAPTER_DIR = "adapter"  # a task directory's PEFT adapter dir ...
PROJECTOR_FILE = "projector.safetensors"  # ... and its projector's weights
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_UNSUPPORTED = ("use_dora", "lora_bias")  # variants whose update is not s·B·A


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches a dotted suffix of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_pair(module: str, B: Tensor, A: Tensor) -> None:
    """B (out, r) and A (r, in) with the same r ≥ 1, every value finite."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
        raise ValueError(f"LoRA module {module!r}: rank mismatch, A {tuple(A.shape)} vs B {tuple(B.shape)}")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError(f"LoRA module {module!r}: non-finite values (NaN/inf) in its factors")


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {adapter_dir}; is it a PEFT adapter dir?")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported")
    enabled = [key for key in _UNSUPPORTED if config.get(key)]
    if enabled:
        raise ValueError(f"{path}: {enabled} set; only plain LoRA (ΔW = s·B·A) adapters are supported")
    return config


def lora_factors(adapter_dir: Path) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{module: (B (out, r), A (r, in), scale)} of a PEFT LoRA adapter dir, validated (finite, matching ranks)."""
    config = read_adapter_config(adapter_dir)
    weights = load_file(str(Path(adapter_dir) / WEIGHTS_FILE))
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in weights.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r}; only lora_A/lora_B weights are supported")
        pairs.setdefault(key[: -len(suffix)], {})[_SUFFIXES[suffix]] = tensor
    if not pairs:
        raise ValueError(f"{adapter_dir}: the adapter holds no LoRA weights")
    factors = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r}: has only lora_{''.join(pair)}, needs both A and B")
        B, A = pair["B"], pair["A"]
        _check_pair(module, B, A)
        rank = A.shape[0]
        configured = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if rank != configured:
            raise ValueError(f"LoRA module {module!r}: rank {rank} but adapter_config.json says {configured}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[module] = (B, A, float(scale))
    return factors


def check_task_dir(
    task_dir: Path, linears: Mapping[str, tuple[int, int]], projector: Mapping[str, tuple[int, ...]]
) -> None:
    """A task directory in `save_task`'s layout (adapter/ + projector.safetensors) that fits a base.

    `linears`: the base's {PEFT module name: (out, in)}; `projector`: its projector's {key: shape}
    (many.model.shapes). Every LoRA module must wrap one of those layers with B (out, r) and A (r, in), ranks as
    in adapter_config.json, the projector must have exactly the base's keys and shapes, every value finite.
    """
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise FileNotFoundError(f"no directory {task_dir}; give one holding {ADAPTER_DIR}/ (PEFT LoRA) and {PROJECTOR_FILE}")
    for module, (B, A, _) in lora_factors(task_dir / ADAPTER_DIR).items():
        if module not in linears:
            raise ValueError(f"LoRA module {module!r} is not a linear layer of the base; was it trained on another model?")
        if (B.shape[0], A.shape[1]) != linears[module]:
            out, inp = linears[module]
            raise ValueError(f"LoRA module {module!r} is {B.shape[0]}×{A.shape[1]} (out×in) but the base layer is {out}×{inp}")
    path = task_dir / PROJECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PROJECTOR_FILE} in {task_dir}: the task's vision projector is part of its adapter")
    weights = load_file(str(path))
    if set(weights) != set(projector):
        raise ValueError(f"{PROJECTOR_FILE} holds {sorted(weights)} but the base's projector has {sorted(projector)}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(projector[key]):
            raise ValueError(f"{PROJECTOR_FILE}: {key} is {tuple(value.shape)} but the base's is {tuple(projector[key])}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{PROJECTOR_FILE}: {key} has non-finite values (NaN/inf)")


def write_portable_config(src: Path, dest: Path) -> None:
    """adapter_config.json from `src` to `dest` (may be the same file) with `base_model_name_or_path` cleared: PEFT
    records where the base was loaded from, a local path that would make equal adapters differ by machine (and so
    every downstream cache key, docs/design.md §2)."""
    config = json.loads(Path(src).read_text())
    Path(dest).write_text(json.dumps({**config, "base_model_name_or_path": None}, indent=2, sort_keys=True))


def copy_task_dir(src: Path, dest: Path) -> Path:
    """The files of a task directory a run reads — adapter config and weights, projector — into `dest`, the config
    made portable (`write_portable_config`)."""
    (dest / ADAPTER_DIR).mkdir(parents=True)
    write_portable_config(Path(src) / ADAPTER_DIR / CONFIG_FILE, dest / ADAPTER_DIR / CONFIG_FILE)
    for name in (f"{ADAPTER_DIR}/{WEIGHTS_FILE}", PROJECTOR_FILE):
        (dest / name).write_bytes((Path(src) / name).read_bytes())
    return dest


def save_task(model: PeftModel, out_dir: Path) -> Path:
    """Write `out_dir/adapter/` (PEFT, safetensors) and `out_dir/projector.safetensors`.

    The files hold no local path: PEFT records where the base was loaded from (`base_model_name_or_path`,
    and a README model card), which would make equal adapters differ by machine and cache directory —
    and so every downstream cache key (docs/design.md §2)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir / ADAPTER_DIR), safe_serialization=True)
    (out_dir / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
    config_path = out_dir / ADAPTER_DIR / CONFIG_FILE
    write_portable_config(config_path, config_path)
    state = {k: v.detach().cpu().contiguous() for k, v in projector_of(model).state_dict().items()}
    save_file(state, str(out_dir / PROJECTOR_FILE))
    return out_dir


def projector_state(task_dir: Path) -> dict[str, Tensor]:
    """A task's projector weights (keys as in the projector module, e.g. "linear_1.weight")."""
    path = Path(task_dir) / PROJECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no projector at {path}; is {task_dir} a directory written by save_task?")
    return load_file(str(path))


def load_task(base_model: LlavaForConditionalGeneration, task_dir: Path) -> PeftModel:
    """A copy of the base with the task's adapter and projector, in eval mode; the base is left unchanged."""
    from peft import PeftModel  # here, not above: reading factors and checking task dirs need no PEFT

    adapter_dir = Path(task_dir) / ADAPTER_DIR
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no PEFT adapter at {adapter_dir}; is {task_dir} a directory written by save_task?")
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir))
    projector_of(model).load_state_dict(projector_state(Path(task_dir)))
    return model.eval()


def write_lora_adapter(
    factors: Mapping[str, tuple[Tensor, Tensor]], base_adapter_config: Mapping, out_dir: Path
) -> Path:
    """A standard PEFT adapter dir holding ΔW = B·A per module (scale 1: lora_alpha = r), weights in float32.

    The most common rank becomes `r`; modules of another rank go to rank_pattern/alpha_pattern.
    `base_adapter_config` (a task's adapter_config.json) supplies target_modules and the rest.
    """
    if not factors:
        raise ValueError("no LoRA factors to write")
    tensors, ranks = {}, {}
    for module, (B, A) in factors.items():
        _check_pair(module, B, A)
        tensors[f"{module}.lora_A.weight"] = A.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{module}.lora_B.weight"] = B.detach().to("cpu", torch.float32).contiguous()
        ranks[module] = A.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m.removeprefix(PEFT_PREFIX)): r for m, r in ranks.items() if r != rank}
    config = {
        **base_adapter_config,
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))  # config last: dir complete
    return out_dir
