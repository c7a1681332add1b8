"""The word-level text convention of mini-UCIT's tasks and captions (docs/design.md §7).

Text is lowercase; a token is either one of the punctuation characters in PUNCTUATION (each its own token) or a
maximal run of other non-whitespace characters. Every task generator and generic caption emits only words from
`vocabulary()` plus these punctuation tokens. (The tiny base's tokenizer does not depend on this: it is a byte-level
BPE that reads any text, many.model.tiny.)"""

from __future__ import annotations

import re
from collections.abc import Iterable

PUNCTUATION = ".,?!:;()"
_TOKEN = re.compile(r"[.,?!:;()]|[^\s.,?!:;()]+")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def article(word: str) -> str:
    """ "a" or "an", by the first letter of the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def tokens(text: str) -> list[str]:
    """Words and punctuation tokens of `text`, in order."""
    return _TOKEN.findall(text)


def words(text: str) -> list[str]:
    """The words of `text` (its tokens without the punctuation)."""
    return [token for token in tokens(text) if token not in PUNCTUATION]


def words_of(*texts: str | Iterable[str]) -> frozenset[str]:
    """Every word in the given strings or collections of strings (templates: `{…}` slots are skipped)."""
    found: set[str] = set()
    for item in texts:
        for text in [item] if isinstance(item, str) else item:
            found.update(word for word in words(text) if not word.startswith("{"))
    return frozenset(found)
