"""chart-qa, the ArxivQA analogue (docs/design.md §7): a bar chart on white grid paper, a multiple-choice question
about the tallest or shortest bar with colour options a) … d) → one letter."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from many.data.draw import PALETTE, jitter, textured, to_image
from many.data.mini_ucit.kind import Caption, Example, Generator, TaskKind
from many.data.mini_ucit.text import NUMBER_WORDS, words_of

LETTERS = ("a", "b", "c", "d")
QUESTIONS = {  # extreme → question wordings; the answer is the bar with the max (or min) height
    "max": ("which bar is the tallest?", "which colour has the highest bar?"),
    "min": ("which bar is the shortest?", "which colour has the lowest bar?"),
}
SUFFIX = "answer with the letter."
CAPTION = "a bar chart with {n} bars"
BAR_COUNTS = (3, 4)


def _chart(rng: Generator, size: int) -> tuple[Image.Image, list[str], list[int]]:
    pixels = textured(rng, size, jitter(rng, (250, 250, 250), 4), noise=2.0)
    offset = int(rng.integers(0, 6))
    pixels[offset::6, :] -= 28  # light horizontal grid lines
    image = to_image(pixels)
    draw = ImageDraw.Draw(image)
    left, bottom, top = 3, size - 4, 3
    draw.line((left, top, left, bottom), fill=(20, 20, 20))
    draw.line((left, bottom, size - 2, bottom), fill=(20, 20, 20))
    n = int(rng.choice(BAR_COUNTS))
    colours = [str(c) for c in rng.choice(list(PALETTE), size=n, replace=False)]
    step = 3 if size >= 24 else 1  # small images: finer height steps so every bar still differs
    heights = [int(h) for h in rng.choice(np.arange(4, bottom - top + 1, step), size=n, replace=False)]
    slot = (size - 2 - (left + 2)) / n
    width = max(2, int(slot * rng.uniform(0.5, 0.75)))
    for k, (colour, height) in enumerate(zip(colours, heights)):
        x0 = int(left + 2 + k * slot)
        draw.rectangle((x0, bottom - height, x0 + width - 1, bottom - 1), fill=jitter(rng, PALETTE[colour], 15))
    return image, colours, heights


def instruct(rng: Generator, size: int) -> Example:
    image, colours, heights = _chart(rng, size)
    extreme = "max" if rng.random() < 0.5 else "min"
    target = colours[int(np.argmax(heights) if extreme == "max" else np.argmin(heights))]
    options = [colours[int(k)] for k in rng.permutation(len(colours))]
    listed = " ".join(f"{letter}) {colour}" for letter, colour in zip(LETTERS, options))
    question = QUESTIONS[extreme][int(rng.integers(2))]
    return Example(image, f"{question} {listed}. {SUFFIX}", LETTERS[options.index(target)])


def describe(rng: Generator, size: int) -> Caption:
    image, colours, _ = _chart(rng, size)
    return Caption(image, CAPTION.format(n=NUMBER_WORDS[len(colours)]))


KIND = TaskKind(
    "chart-qa",
    "exact_match",
    instruct,
    describe,
    words_of(LETTERS, PALETTE, *QUESTIONS.values(), SUFFIX, CAPTION, [NUMBER_WORDS[n] for n in BAR_COUNTS]),
)
