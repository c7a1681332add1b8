"""Where things are in a loaded LLaVA, whether or not PEFT wraps it: its vision→LLM projector, the PEFT name of a
layer, the longest sequence it accepts, its device and compute dtype. Facts about a model, no training."""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn
from transformers import LlavaForConditionalGeneration

PROJECTOR = "multi_modal_projector"  # the projector's attribute name in transformers' LLaVA
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix before the wrapped model's own module names


def llava(model: LlavaForConditionalGeneration | PeftModel) -> LlavaForConditionalGeneration:
    """The LLaVA model itself, unwrapping a PeftModel: what reads the vision tower, the projector or the config
    (many.prototypes' features, many.evaluate's generation) works on the base LLaVA and a PeftModel around it alike."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def projector_of(model: nn.Module) -> nn.Module:
    """The vision→LLM projector module, found by name whether or not PEFT wraps the model."""
    found = [module for name, module in model.named_modules() if name.split(".")[-1] == PROJECTOR]
    if len(found) != 1:
        raise ValueError(f"expected one `{PROJECTOR}` module in the model, found {len(found)}; is it a LLaVA?")
    return found[0]


def max_positions(model: nn.Module) -> int:
    """The longest sequence the language model accepts; longer training samples are an error, not a truncation."""
    return int(model.config.text_config.max_position_embeddings)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and its compute dtype (the dtype of its frozen weights)."""
    parameter = next(model.parameters())
    dtypes = {p.dtype for p in model.parameters()}
    half = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    return parameter.device, half[0] if half else parameter.dtype
