"""Load any LLaVA checkpoint — the embedded tiny one saved by the `base` stage or a HF LLaVA
(e.g. ``llava-hf/llava-1.5-7b-hf``) — through one code path; dtype and device from `BaseConfig`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from many.config import BaseConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; asking for cuda without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("base.device is 'cuda' but no CUDA device is visible; use device: auto or cpu")
    return torch.device(device)


def load_base(path: str | Path, cfg: BaseConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA model (eval mode, on cfg.device, in cfg.dtype) and its processor from a HF dir or hub id."""
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("base.dtype float16 is not supported on CPU; use float32 or bfloat16")
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype).to(device)
    processor = AutoProcessor.from_pretrained(str(path))
    model.eval()
    return model, processor


def save_base(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: Path) -> Path:
    """Write a standard HF model dir (config, safetensors, tokenizer, processor)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
