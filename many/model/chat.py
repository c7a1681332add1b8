"""Prompt format and batch encoding shared by pretraining, fine-tuning, statistics and evaluation.

One single-turn LLaVA-1.5 conversation per sample: ``USER: <image>\\n{prompt} ASSISTANT: {answer}</s>``.
Training batches are right-padded and carry labels only on answer tokens (+ EOS);
generation batches are left-padded and stop at EOS.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import LlavaProcessor

from many.data.schema import Sample

IMAGE_TOKEN = "<image>"
PROMPT_TEMPLATE = "USER: " + IMAGE_TOKEN + "\n{prompt} ASSISTANT:"
IGNORE_INDEX = -100  # positions without loss (image, prompt, padding)
SHOWN = 3  # unknown words / samples named in one message

log = logging.getLogger("many.model")


def decode_image(sample: Sample) -> Image.Image:
    """The sample's PNG as an RGB PIL image; names the sample when the bytes are not an image."""
    try:
        return Image.open(io.BytesIO(sample.image)).convert("RGB")
    except Exception as err:  # PIL raises several unrelated types for bad bytes
        raise ValueError(f"sample {sample.sample_id!r}: image is not decodable ({err})") from err


def prompt_text(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def sequence_text(sample: Sample) -> str:
    """The text of a training sequence without its image: what the tiny base's tokenizer is trained on
    (many.model.tiny.build_tokenizer), so the template's words become tokens of their own."""
    return prompt_text(sample.prompt).replace(IMAGE_TOKEN, "") + " " + sample.answer


def unknown_words(tokenizer, texts: Sequence[str]) -> dict[int, list[str]]:
    """Index → the words of texts[index] that the tokenizer can only encode as its unknown token, for every text that
    has any. Always empty for a tokenizer without an unknown token (the tiny base's byte-level BPE, Llama's byte
    fallback); a word-level or WordPiece tokenizer turns words outside its vocabulary into `<unk>`, and a model
    trained or scored on those can never produce them."""
    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return {}
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    found = {}
    for index, (text, row) in enumerate(zip(texts, rows, strict=True)):
        if unk in row:
            words = [w for w in text.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
            found[index] = words or [text]
    return found


def _named(samples: Sequence[Sample], found: dict[int, list[str]]) -> str:
    shown = [f"{samples[i].sample_id!r} ({', '.join(repr(w) for w in words[:SHOWN])})" for i, words in found.items()]
    more = f" and {len(shown) - SHOWN} more" if len(shown) > SHOWN else ""
    return "; ".join(shown[:SHOWN]) + more


def check_known(processor: LlavaProcessor, samples: Sequence[Sample], *, training: bool) -> None:
    """Loud about text the base's tokenizer cannot represent (docs/design.md §7): an answer word that would be
    `<unk>` is an error when training (the model would learn to emit `<unk>`, which decodes to nothing) and a
    warning when scoring (no prediction can match it); a prompt word that would be `<unk>` is a warning."""
    tokenizer = processor.tokenizer
    answers = unknown_words(tokenizer, [s.answer for s in samples])
    if answers and training:
        raise ValueError(
            f"the base's tokenizer has no tokens for answer words of {len(answers)} samples: {_named(samples, answers)}; "
            "they would be learned as <unk> and predicted as nothing. Use a base whose tokenizer covers the task's "
            "text (base.kind 'tiny' has a byte-level one that covers any text)"
        )
    if answers:
        log.warning("the base's tokenizer has no tokens for reference answer words of %d samples: %s; no prediction "
                    "can match them", len(answers), _named(samples, answers))
    prompts = unknown_words(tokenizer, [s.prompt for s in samples])
    if prompts:
        log.warning("the base's tokenizer reads prompt words of %d samples as <unk>: %s", len(prompts),
                    _named(samples, prompts))


def encode_for_training(
    processor: LlavaProcessor, samples: Sequence[Sample], max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask/labels (B, L) + pixel_values (B, 3, H, W); loss on answer + EOS only.
    An answer word the tokenizer can only encode as `<unk>` is an error (`check_known`)."""
    check_known(processor, samples, training=True)
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
    """Left-padded prompts (B, L) + pixel_values, ready for `model.generate`; warns about `<unk>` (`check_known`)."""
    check_known(processor, samples, training=False)
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
