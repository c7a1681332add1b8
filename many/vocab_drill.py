"""The vocabulary drill of the tiny base's pretraining (docs/design.md §7): every token of its byte-level BPE that some
UTF-8 text can produce is the answer token of some pretraining sample, so every row of the output head is trained.

Task fine-tuning freezes the output head (a LoRA and a projector train), and a row pretraining never trained stays
at its random init, far below every trained one: no LoRA could make the model write that token. BPE keeps the
intermediate merges that built longer tokens ("ra" on the way to a longer word), which the pretraining text never
emits but a new word ("zebra" = "Ġ z e b ra") may be written with; the drill echoes each of them once.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

from many.data.mini_ucit.generic import BYTE_COVER, ECHO_PROMPT
from many.data.schema import Sample
from many.model.chat import IMAGE_TOKEN, prompt_text, sequence_text
from many.model.tiny import byte_tokens

BYTES = {token: byte for byte, token in byte_tokens().items()}  # byte-level token character → the byte it stands for
DRILL_CONTEXTS = ("{}", "({}", "a{}", "1{}", "x {}")  # answers tried, in order, until one emits the token


def answer_tokens(tokenizer: PreTrainedTokenizerFast, samples: Sequence[Sample]) -> set[int]:
    """Every token id some answer of `samples` emits in its chat context (what pretraining trains the model to output;
    the prompt's tokens end at "ASSISTANT:", a pre-token boundary, so the answer's tokens are the rest)."""
    prompts = tokenizer([prompt_text(s.prompt).replace(IMAGE_TOKEN, "") for s in samples], add_special_tokens=False)
    fulls = tokenizer([sequence_text(s) for s in samples], add_special_tokens=False)
    return {i for p, f in zip(prompts["input_ids"], fulls["input_ids"], strict=True) for i in f[len(p) :]}


def _drill_answers(tokenizer: PreTrainedTokenizerFast, token_id: int) -> list[str]:
    """Answers that may emit `token_id`: its text in DRILL_CONTEXTS, or for a part of a multi-byte character (no text
    of its own) the characters of generic.BYTE_COVER whose UTF-8 holds its bytes, in DRILL_CONTEXTS."""
    raw = bytes(BYTES[c] for c in tokenizer.convert_ids_to_tokens(token_id))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # after the template's space, " " + the character may merge: try the contexts too
        return [context.format(c) for c in BYTE_COVER[1] if raw in c.encode() for context in DRILL_CONTEXTS]
    if not text.strip():
        return [f"a{text}b"]  # whitespace between two words
    bare = text[1:] if text.startswith(" ") else text
    return [context.format(bare if context == "{}" else text) for context in DRILL_CONTEXTS]


def vocabulary_drill(tokenizer: PreTrainedTokenizerFast, samples: Sequence[Sample]) -> tuple[Sample, ...]:
    """Echo samples ("repeat: ra" → "ra", each on the image of a pretraining sample, in token order) for the
    tokens no answer of `samples` emits. Left out: tokens no answer can emit (bytes that never occur in UTF-8)."""
    emitted = answer_tokens(tokenizer, samples)
    special = set(tokenizer.all_special_ids)
    drill: list[Sample] = []
    for token_id in range(len(tokenizer)):
        if token_id in emitted or token_id in special:
            continue
        for answer in _drill_answers(tokenizer, token_id):
            echo = Sample(f"pretrain/drill/{len(drill):06d}", samples[len(drill) % len(samples)].image,
                          ECHO_PROMPT.format(text=answer), answer)
            if token_id in answer_tokens(tokenizer, [echo]):
                drill.append(echo)
                emitted |= answer_tokens(tokenizer, [echo])
                break
    return tuple(drill)
