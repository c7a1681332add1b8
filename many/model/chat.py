"""Prompt format and batch encoding shared by pretraining, fine-tuning, statistics and evaluation.

One single-turn LLaVA-1.5 conversation per sample: ``USER: <image>\\n{prompt} ASSISTANT: {answer}</s>``.
Training batches are right-padded and carry labels only on answer tokens (+ EOS);
generation batches are left-padded and stop at EOS.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import LlavaProcessor

from many.data.schema import Sample

IMAGE_TOKEN = "<image>"
PROMPT_TEMPLATE = "USER: " + IMAGE_TOKEN + "\n{prompt} ASSISTANT:"
CHAT_TEMPLATE_WORDS = ("user", "assistant")
IGNORE_INDEX = -100  # positions without loss (image, prompt, padding)


def decode_image(sample: Sample) -> Image.Image:
    """The sample's PNG as an RGB PIL image; names the sample when the bytes are not an image."""
    try:
        return Image.open(io.BytesIO(sample.image)).convert("RGB")
    except Exception as err:  # PIL raises several unrelated types for bad bytes
        raise ValueError(f"sample {sample.sample_id!r}: image is not decodable ({err})") from err


def prompt_text(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def encode_for_training(
    processor: LlavaProcessor, samples: Sequence[Sample], max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask/labels (B, L) + pixel_values (B, 3, H, W); loss on answer + EOS only."""
    tokenizer = processor.tokenizer
    images = [decode_image(s) for s in samples]
    prompts = [prompt_text(s.prompt) for s in samples]
    fulls = [p + " " + s.answer + tokenizer.eos_token for p, s in zip(prompts, samples, strict=True)]
    tokenizer.padding_side = "right"
    batch = processor(images=images, text=fulls, return_tensors="pt", padding=True)
    prompt_ids = processor(images=images, text=prompts, return_tensors="pt", padding=True)["attention_mask"]
    prompt_lengths = prompt_ids.sum(dim=1)  # (B,)
    labels = batch["input_ids"].clone()
    positions = torch.arange(labels.shape[1]).unsqueeze(0)  # (1, L)
    labels[positions < prompt_lengths.unsqueeze(1)] = IGNORE_INDEX
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
           "pixel_values": batch["pixel_values"], "labels": labels}
    if max_length is not None and out["input_ids"].shape[1] > max_length:
        raise ValueError(
            f"a training sequence has {out['input_ids'].shape[1]} tokens > max_length {max_length} "
            f"(first sample {samples[0].sample_id!r}); shorten prompts/answers or raise max_length"
        )
    return out


def encode_for_generation(processor: LlavaProcessor, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Left-padded prompts (B, L) + pixel_values, ready for `model.generate`."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    try:
        batch = processor(
            images=[decode_image(s) for s in samples],
            text=[prompt_text(s.prompt) for s in samples],
            return_tensors="pt",
            padding=True,
        )
    finally:
        tokenizer.padding_side = "right"
    return dict(batch)


def decode_answers(processor: LlavaProcessor, generated: torch.Tensor) -> list[str]:
    """Decode newly generated ids (B, T) up to (excluding) the first EOS."""
    tokenizer = processor.tokenizer
    answers = []
    for row in generated.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
