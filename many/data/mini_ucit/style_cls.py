"""style-cls, the ImageNet-R analogue (docs/design.md §7): name one shape drawn in one of several renditions
(outline, solid, striped, noisy, inverted) on grainy paper → one word."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from many.data.draw import PALETTE, SHAPES, draw_shape, jitter, pick, textured, to_image
from many.data.mini_ucit.kind import Caption, Example, Generator, TaskKind
from many.data.mini_ucit.text import words_of

RENDITIONS = ("outline", "solid", "striped", "noisy", "inverted")
PROMPTS = (
    "what shape is drawn? answer with one word.",
    "name the shape in this drawing.",
    "which shape is this? one word.",
)
CAPTIONS = {
    "outline": "an outline drawing of a shape",
    "solid": "a solid drawing of a shape",
    "striped": "a striped drawing of a shape",
    "noisy": "a noisy drawing of a shape",
    "inverted": "an inverted drawing of a shape",
}


def _drawing(rng: Generator, size: int) -> tuple[Image.Image, str, str]:
    shape, rendition = pick(rng, SHAPES), pick(rng, RENDITIONS)
    pixels = textured(rng, size, jitter(rng, (238, 230, 212), 14), noise=5.0)
    mask = Image.new("L", (size, size), 0)
    centre = (size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size)
    radius = rng.uniform(0.28, 0.38) * size
    angle = float(rng.uniform(-20, 20))
    if rendition == "outline":
        draw_shape(ImageDraw.Draw(mask), shape, centre, radius, outline=255, width=2, angle_deg=angle)
    else:
        draw_shape(ImageDraw.Draw(mask), shape, centre, radius, fill=255, angle_deg=angle)
    inside = np.asarray(mask) > 0
    if rendition == "striped":
        rows, cols = np.indices((size, size))
        inside &= (rows + cols) % 4 < 2
    pixels[inside] = jitter(rng, PALETTE[pick(rng, tuple(PALETTE))], 20)
    if rendition == "noisy":
        pixels += rng.normal(0.0, 45.0, size=pixels.shape)
    if rendition == "inverted":
        pixels = 255.0 - np.clip(pixels, 0, 255)
    return to_image(pixels), shape, rendition


def instruct(rng: Generator, size: int) -> Example:
    image, shape, _ = _drawing(rng, size)
    return Example(image, pick(rng, PROMPTS), shape)


def describe(rng: Generator, size: int) -> Caption:
    image, _, rendition = _drawing(rng, size)
    return Caption(image, CAPTIONS[rendition])


KIND = TaskKind("style-cls", "exact_match", instruct, describe, words_of(PROMPTS, SHAPES, CAPTIONS.values()))
