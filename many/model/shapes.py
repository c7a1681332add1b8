"""The shapes of a base's linear layers and projector, from its config alone (no weights, no base stage).

Used to check a user-supplied adapter before a run writes anything: the model is instantiated on the
`meta` device, which allocates nothing, so this is instant even for a 7B architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from many.config import BaseConfig
from many.model.parts import PEFT_PREFIX, projector_of

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BaseShapes:
    linears: dict[str, tuple[int, int]]  # PEFT module name → (out, in) of every nn.Linear
    projector: dict[str, Shape]  # projector state-dict key (e.g. "linear_1.weight") → shape


def architecture(cfg: BaseConfig) -> LlavaConfig:
    """The base's LlavaConfig: the tiny one from `cfg.tiny`, a HF one from `cfg.hf_id`'s config.json."""
    if cfg.kind == "tiny":
        from many.model.tiny import build_tokenizer, tiny_llava_config

        return tiny_llava_config(cfg.tiny, build_tokenizer([]))  # the vocabulary sizes no LoRA-targeted layer
    try:
        return LlavaConfig.from_pretrained(str(cfg.hf_id))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the config of base.hf_id {cfg.hf_id!r}: {' '.join(str(error).split())}") from None


def base_shapes(cfg: BaseConfig) -> BaseShapes:
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(architecture(cfg))
    linears = {
        PEFT_PREFIX + name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    projector = {key: tuple(value.shape) for key, value in projector_of(model).state_dict().items()}
    return BaseShapes(linears, projector)
