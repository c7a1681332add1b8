"""noisy-caption, the VizWiz-caption analogue (docs/design.md §7): a dim "photo" of one object, degraded by blur,
darkness, tilt or a covering hand → a short caption naming the defect and the object."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from many.data.draw import PALETTE, draw_shape, gradient, jitter, pick, to_image
from many.data.mini_ucit.kind import Caption, Example, Generator, TaskKind
from many.data.mini_ucit.text import article, words_of

OBJECTS = ("circle", "square", "triangle", "star")
ROOM_TONES = ((95, 80, 65), (60, 70, 95), (105, 100, 80), (70, 90, 75))  # dim indoor backdrops
SKIN = (205, 160, 130)
PROMPTS = (
    "write a short caption for this photo.",
    "a blind user took this photo. describe it briefly.",
)
CAPTION = "a {defect} photo of {article} {colour} {shape}"
PRETRAIN_CAPTION = "a low quality photo of an object"


def _blurry(rng: Generator, image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 1.6))))


def _dark(rng: Generator, image: Image.Image) -> Image.Image:
    return to_image(np.asarray(image, dtype=np.float64) * rng.uniform(0.3, 0.45))


def _tilted(rng: Generator, image: Image.Image) -> Image.Image:
    angle = float(rng.uniform(25, 45)) * (1 if rng.random() < 0.5 else -1)
    return image.rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=(15, 15, 15))


def _covered(rng: Generator, image: Image.Image) -> Image.Image:
    size = image.width
    covered = image.copy()
    depth = int(size * rng.uniform(0.3, 0.4))
    box = {  # a finger over one edge of the lens
        "left": (0, 0, depth, size),
        "right": (size - depth, 0, size, size),
        "bottom": (0, size - depth, size, size),
    }[pick(rng, ("left", "right", "bottom"))]
    ImageDraw.Draw(covered).rectangle(box, fill=jitter(rng, SKIN, 20))
    return covered


DEFECTS = {"blurry": _blurry, "dark": _dark, "tilted": _tilted, "covered": _covered}


def _photo(rng: Generator, size: int) -> tuple[Image.Image, str, str, str]:
    tone = ROOM_TONES[int(rng.integers(len(ROOM_TONES)))]
    pixels = gradient(size, jitter(rng, tone, 20), jitter(rng, tuple(int(c * 1.4) for c in tone), 20))
    image = to_image(pixels + rng.normal(0.0, 10.0, size=(size, size, 1)))
    shape, colour = pick(rng, OBJECTS), pick(rng, tuple(PALETTE))
    centre = (size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size)
    radius = rng.uniform(0.25, 0.33) * size
    draw_shape(ImageDraw.Draw(image), shape, centre, radius, fill=jitter(rng, PALETTE[colour], 20))
    defect = pick(rng, tuple(DEFECTS))
    return DEFECTS[defect](rng, image), defect, colour, shape


def instruct(rng: Generator, size: int) -> Example:
    image, defect, colour, shape = _photo(rng, size)
    caption = CAPTION.format(defect=defect, article=article(colour), colour=colour, shape=shape)
    return Example(image, pick(rng, PROMPTS), caption)


def describe(rng: Generator, size: int) -> Caption:
    return Caption(_photo(rng, size)[0], PRETRAIN_CAPTION)


KIND = TaskKind(
    "noisy-caption",
    "caption",
    instruct,
    describe,
    words_of(PROMPTS, CAPTION, ("a", "an"), DEFECTS, PALETTE, OBJECTS, PRETRAIN_CAPTION),
)
