"""The tiny base's byte-level BPE tokenizer (docs/design.md §7) and the loud `<unk>` check of the chat encoding."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from many.data import MiniUcitConfig, Sample, pretrain_samples
from many.model.chat import check_known, sequence_text, unknown_words
from many.model.tiny import SPECIAL_TOKENS, build_tokenizer, byte_tokens
from many.vocab_drill import answer_tokens, vocabulary_drill

SAMPLES = pretrain_samples(MiniUcitConfig(image_size=16), 280)
TEXTS = [sequence_text(s) for s in SAMPLES]
# Code points to draw random strings from: ASCII with control characters, Latin-1, Greek, CJK, emoji, private use,
# and the special tokens' own spellings.
RANGES = [(0x00, 0x7F), (0x80, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4E80), (0x1F600, 0x1F64F), (0x10FF00, 0x10FFFD)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(TEXTS)


def random_string(rng: np.random.Generator) -> str:
    parts = []
    for _ in range(int(rng.integers(0, 12))):
        if rng.random() < 0.1:
            parts.append(str(rng.choice([*SPECIAL_TOKENS, " ", "  ", "\n", "ASSISTANT:"])))
        else:
            lo, hi = RANGES[int(rng.integers(len(RANGES)))]
            parts.append(chr(int(rng.integers(lo, hi + 1))))
    return "".join(parts)


def test_any_utf8_string_round_trips(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = np.random.default_rng(0)
    strings = [random_string(rng) for _ in range(1000)] + ["", " zebra  Kiwi\tü", "ÿ\x00\U0010fffd", "a </s> b"]
    for text in strings:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.unk_token_id is None and not unknown_words(tokenizer, strings)


def test_vocabulary_is_specials_bytes_then_merges_of_the_text(tokenizer: PreTrainedTokenizerFast) -> None:
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert set(byte_tokens().values()) == set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    assert len(tokenizer) == 512  # the default cap, reached: the text has more frequent pairs
    assert tokenizer.tokenize("describe the image.") == ["describe", "Ġthe", "Ġimage", "."]  # frequent words: 1 token
    assert len(build_tokenizer(TEXTS, vocab_size=300)) == 300
    assert len(build_tokenizer([])) == len(SPECIAL_TOKENS) + 256  # nothing to merge: bytes only


def _digest(texts: list[str]) -> str:
    return hashlib.sha256(build_tokenizer(texts).backend_tokenizer.to_str().encode()).hexdigest()


def test_same_text_same_tokenizer_bytes_in_another_process() -> None:
    code = (
        "import sys; from tests.many.test_tokenizer import TEXTS, _digest; "
        "sys.stdout.write(_digest(TEXTS))"
    )
    root = str(Path(__file__).resolve().parents[2])  # this checkout, not an installed copy of the package
    env = {"PYTHONPATH": root, "PYTHONHASHSEED": "123", "RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root)
    assert other.stdout == _digest(TEXTS) == _digest(list(TEXTS))
    assert _digest(TEXTS[:100]) != _digest(TEXTS)


def test_every_token_is_an_answer_of_pretraining_once_drilled(tokenizer: PreTrainedTokenizerFast) -> None:
    """Every output row of the base is trained: each token the tokenizer can produce from UTF-8 is emitted by some
    answer of the pretraining mixture or of its vocabulary drill."""
    drill = vocabulary_drill(tokenizer, SAMPLES)
    emitted = answer_tokens(tokenizer, (*SAMPLES, *drill))
    never_utf8 = {tokenizer.convert_tokens_to_ids(byte_tokens()[b]) for b in (0xC0, 0xC1, *range(0xF5, 0x100))}
    assert set(range(len(tokenizer))) - emitted - set(tokenizer.all_special_ids) == never_utf8
    assert len(drill) < len(tokenizer) and all(s.prompt == f"repeat: {s.answer}" for s in drill)
    assert not answer_tokens(tokenizer, SAMPLES) >= emitted  # the drill adds tokens the mixture alone never writes


def _word_level() -> SimpleNamespace:
    core = Tokenizer(WordLevel({"<unk>": 0, "what": 1, "is": 2, "it": 3, "red": 4, "?": 5}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return SimpleNamespace(tokenizer=PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>"))


def test_unknown_answer_words_fail_training_and_warn_scoring(caplog: pytest.LogCaptureFixture) -> None:
    processor = _word_level()
    good = Sample("t/0", b"", "what is it?", "red")
    bad = Sample("t/1", b"", "what is it?", "red zebra")
    check_known(processor, [good], training=True)  # nothing unknown: silent
    with pytest.raises(ValueError, match=r"answer words of 1 samples: 't/1' \('zebra'\); they would be learned as <unk>"):
        check_known(processor, [good, bad], training=True)
    with caplog.at_level(logging.WARNING, logger="many.model"):
        check_known(processor, [bad, Sample("t/2", b"", "what is a quokka?", "red")], training=False)
    assert "reference answer words of 1 samples: 't/1' ('zebra')" in caplog.text
    assert "prompt words of 1 samples as <unk>: 't/2' ('a', 'quokka?')" in caplog.text


def test_answers_longer_than_the_generation_budget_warn(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    from many.evaluate import warn_if_cut

    processor = SimpleNamespace(tokenizer=tokenizer)
    samples = [Sample("t/0", b"", "q", "red"), Sample("t/1", b"", "q", "a quokka and a zebra eat a mango")]
    with caplog.at_level(logging.WARNING, logger="many.evaluate"):
        warn_if_cut(processor, "cards", samples, max_new_tokens=24)
        assert not caplog.text
        warn_if_cut(processor, "cards", samples, max_new_tokens=8)
    long = len(tokenizer.encode(" " + samples[1].answer, add_special_tokens=False))
    assert f"task 'cards': 1 reference answers need more than eval.max_new_tokens = 8 tokens (the longest, 't/1', {long})" \
        in caplog.text and 8 < long <= 24
