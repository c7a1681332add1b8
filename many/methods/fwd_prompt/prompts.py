"""Soft prompts on a frozen LLaVA through ordinary prompt tokens (Fwd-Prompt's prompt tuning; docs/design.md §1).

n special tokens "<prompt_0>" … "<prompt_{n-1}>" are added to a copy of the tokenizer and written in front of every
user prompt ("USER: <image>\\n<prompt_0> … <prompt_{n-1}> {prompt} ASSISTANT:"), so encoding, training, generation
and evaluation run unchanged on prompted samples. The model's input embedding is wrapped:

    e(id) = p_{id − first}   if first ≤ id < first + n      (the trainable prompts, (n, d) float32)
            E[id]            otherwise                       (the frozen base token embedding)

Why a wrapper rather than `resize_token_embeddings` + a gradient mask on the new rows: LLaVA's lm_head is untied
(docs/design.md §8), so resizing would also add n output logits — the base would change its answer distribution before
any training and could emit prompt tokens — and the optimizer and the gradient projection would see the whole
(V, d) matrix. The wrapper keeps the output vocabulary, makes the (n, d) prompts the only trainable tensor, and
works whether the new token ids fall past the embedding (the tiny tokenizer) or on its padded rows (LLaVA-1.5's
32002 tokens on 32064 rows).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase

from many.data.schema import Sample

PROMPT_TOKEN = "<prompt_{}>"


def prompt_tokens(n: int) -> list[str]:
    """["<prompt_0>", …, "<prompt_{n-1}>"]."""
    if n < 1:
        raise ValueError(f"prompt_tokens: need at least one prompt token, got n={n}")
    return [PROMPT_TOKEN.format(i) for i in range(n)]


def prompted_samples(samples: Sequence[Sample], n: int) -> tuple[Sample, ...]:
    """The samples with "<prompt_0> … <prompt_{n-1}> " in front of each user prompt (answers unchanged)."""
    prefix = " ".join(prompt_tokens(n)) + " "
    return tuple(replace(sample, prompt=prefix + sample.prompt) for sample in samples)


def add_prompt_tokens(tokenizer: PreTrainedTokenizerBase, n: int) -> int:
    """Add the n prompt tokens as special tokens (in place); returns the id of "<prompt_0>" (ids are consecutive)."""
    names = prompt_tokens(n)
    tokenizer.add_tokens(names, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + n)):
        raise ValueError(f"add_prompt_tokens: the tokenizer gave the prompt tokens non-consecutive ids {ids[:4]}…; "
                         "pass the base processor, not one that already has other '<prompt_i>' tokens")
    return ids[0]


class PromptedEmbedding(nn.Module):
    """The base token embedding with ids first … first+n−1 read from the trainable prompts instead."""

    def __init__(self, embedding: nn.Embedding, prompts: Tensor, first_id: int) -> None:
        super().__init__()
        if prompts.ndim != 2 or prompts.shape[1] != embedding.embedding_dim:
            raise ValueError(f"PromptedEmbedding: prompts must be (n, {embedding.embedding_dim}), "
                             f"got {tuple(prompts.shape)}")
        self.embedding = embedding
        self.prompts = nn.Parameter(prompts.detach().to(embedding.weight.device, torch.float32).clone())  # (n, d)
        self.first_id = first_id

    @property
    def weight(self) -> Tensor:
        """The base token embedding (V, d): what generation utilities read for the dtype and device."""
        return self.embedding.weight

    def forward(self, input_ids: Tensor) -> Tensor:  # (B, L) → (B, L, d)
        index = input_ids - self.first_id  # (B, L)
        is_prompt = (index >= 0) & (index < self.prompts.shape[0])
        tokens = self.embedding(input_ids.masked_fill(is_prompt, 0))  # prompt positions read row 0, then replaced
        prompts = self.prompts[index.clamp(0, self.prompts.shape[0] - 1)].to(tokens.dtype)  # (B, L, d)
        return torch.where(is_prompt.unsqueeze(-1), prompts, tokens)


def attach_prompts(
    base_model: LlavaForConditionalGeneration, processor: LlavaProcessor, prompts: Tensor
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, PromptedEmbedding]:
    """Copies of the base (frozen) and processor with the prompts (n, d) installed; the base is left unchanged."""
    model = copy.deepcopy(base_model).requires_grad_(False)
    processor = copy.deepcopy(processor)
    first_id = add_prompt_tokens(processor.tokenizer, prompts.shape[0])
    embedding = PromptedEmbedding(model.get_input_embeddings(), prompts, first_id)
    model.set_input_embeddings(embedding)
    return model, processor, embedding
