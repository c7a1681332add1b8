"""The LLaVA inside a model that may be wrapped by PEFT: what reads the vision tower, the projector or the
config of a model (many.prototypes' features, many.evaluate's generation) works on the base LLaVA and on a
PeftModel around it alike."""

from __future__ import annotations

from peft import PeftModel
from transformers import LlavaForConditionalGeneration


def llava(model: LlavaForConditionalGeneration | PeftModel) -> LlavaForConditionalGeneration:
    """The LLaVA model itself, unwrapping a PeftModel."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
