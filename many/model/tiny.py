"""The embedded tiny LLaVA (docs/design.md §7, §8): transformers' own CLIP vision tower + Llama decoder,
a word-level tokenizer saved as a real HF tokenizer, and a CLIP image processor — so the saved
directory is an ordinary HF checkpoint that `from_pretrained` loads like any LLaVA."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from many.config import TinyModelConfig
from many.model.chat import CHAT_TEMPLATE_WORDS, IMAGE_TOKEN

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
# The word-level tokenizer splits on whitespace and on these characters (each becomes its own token).
PUNCTUATION = ".,?!:;()"
_PUNCTUATION_REGEX = Regex("[" + "".join("\\" + c for c in PUNCTUATION) + "]")


def build_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over `vocabulary` (+ chat-template words and punctuation)."""
    words = sorted({w.lower() for w in vocabulary} | set(CHAT_TEMPLATE_WORDS) | set(PUNCTUATION))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(_PUNCTUATION_REGEX, "isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )


def tiny_llava_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The tiny LLaVA's architecture for `tokenizer`'s vocabulary.

    Image tokens per image = (image_size / patch_size)² : the "default" feature strategy drops CLS.
    `vision_feature_layer=-1` because with so few vision layers the usual −2 would skip one (docs/design.md §8).
    """
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=max(cfg.max_length, num_patches + 64),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_tiny_llava(
    cfg: TinyModelConfig, vocabulary: Sequence[str], seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA (`tiny_llava_config`) and its processor."""
    tokenizer = build_tokenizer(vocabulary)
    config = tiny_llava_config(cfg, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
    )
    return model, processor
