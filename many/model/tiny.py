"""The embedded tiny LLaVA (docs/design.md §7, §8): transformers' own CLIP vision tower + Llama decoder,
a byte-level BPE tokenizer trained on the pretraining text, saved as a real HF tokenizer, and a CLIP image processor — so the saved
directory is an ordinary HF checkpoint that `from_pretrained` loads like any LLaVA."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
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
from many.model.chat import IMAGE_TOKEN

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", IMAGE_TOKEN)  # ids 0..3; no <unk>: every byte has a token
MIN_MERGE_FREQUENCY = 2  # a merge must occur at least twice in the pretraining text


def build_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (the base's pretraining prompts and answers).

    The vocabulary is SPECIAL_TOKENS, all 256 byte tokens (GPT-2's byte→character map, so any UTF-8 string has an
    encoding and decodes back to itself: nothing is `<unk>`, nothing is normalised), then the BPE merges learned from
    `texts`, most frequent first, until `vocab_size` tokens or no pair occurs MIN_MERGE_FREQUENCY times. Pre-tokens
    are GPT-2's (a word with its leading space, digit runs, punctuation runs, whitespace), so a merge never crosses
    a word. Deterministic: the same texts give the same tokenizer bytes (ties between equally frequent pairs are
    broken by the pair's ids, and the byte alphabet fixes the initial ids).
    """
    core = Tokenizer(BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_MERGE_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        clean_up_tokenization_spaces=False,  # decode(encode(s)) == s: no " ." → "." rewriting
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
    cfg: TinyModelConfig, texts: Sequence[str], seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA (`tiny_llava_config`) and its processor, its tokenizer trained on `texts`."""
    tokenizer = build_tokenizer(texts, cfg.vocab_size)
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


def byte_tokens() -> dict[int, str]:
    """Byte → its token in the byte-level vocabulary (GPT-2's map, what `pre_tokenizers.ByteLevel` writes): printable
    Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 onwards."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + k) for k, b in enumerate(shifted)}}
