"""grounded-caption, the Flickr30k analogue (docs/design.md §7): two objects in an outdoor scene (sky over ground)
→ a caption naming both objects' colours, shapes and where one is relative to the other."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from many.data.draw import PALETTE, draw_shape, jitter, pick, textured, to_image
from many.data.mini_ucit.kind import Caption, Example, Generator, TaskKind
from many.data.mini_ucit.text import article, words_of

OBJECTS = ("circle", "square", "triangle", "diamond", "star")
SKIES = ((165, 205, 235), (215, 195, 215), (190, 220, 225))
GROUNDS = ((120, 95, 60), (95, 110, 55), (140, 120, 85))
# relation of the first-named object to the second, by the axis they are laid out on and their order
RELATIONS = {("x", 0): "left of", ("x", 1): "right of", ("y", 0): "above", ("y", 1): "below"}
PROMPTS = (
    "describe the scene with colours and positions.",
    "write a caption that says where each object is.",
)
CAPTION = "{first} {relation} {second}"  # each object as "a red circle"
PRETRAIN_CAPTION = "two shapes in a field"


def _scene(rng: Generator, size: int) -> tuple[Image.Image, list[str], str]:
    """The image, the two objects as "a colour shape" in layout order (left/top first), and the layout axis."""
    horizon = int(size * rng.uniform(0.45, 0.6))
    pixels = textured(rng, size, jitter(rng, SKIES[int(rng.integers(len(SKIES)))], 10), noise=3.0)
    ground = jitter(rng, GROUNDS[int(rng.integers(len(GROUNDS)))], 12)
    pixels[horizon:] = np.asarray(ground, dtype=np.float64) + rng.normal(0.0, 9.0, size=(size - horizon, size, 1))
    image = to_image(pixels)
    first = (pick(rng, tuple(PALETTE)), pick(rng, OBJECTS))
    second = first
    while second == first:
        second = (pick(rng, tuple(PALETTE)), pick(rng, OBJECTS))
    axis = "x" if rng.random() < 0.5 else "y"
    across, along = rng.uniform(0.35, 0.65) * size, [0.27 * size, 0.73 * size]
    draw = ImageDraw.Draw(image)
    for (colour, shape), position in zip((first, second), along):
        position += rng.uniform(-0.05, 0.05) * size
        centre = (position, across) if axis == "x" else (across, position)
        draw_shape(draw, shape, centre, size * 0.17, fill=jitter(rng, PALETTE[colour], 15))
    return image, [f"{article(c)} {c} {s}" for c, s in (first, second)], axis


def instruct(rng: Generator, size: int) -> Example:
    image, objects, axis = _scene(rng, size)
    named_first = int(rng.integers(2))
    caption = CAPTION.format(
        first=objects[named_first], relation=RELATIONS[axis, named_first], second=objects[1 - named_first]
    )
    return Example(image, pick(rng, PROMPTS), caption)


def describe(rng: Generator, size: int) -> Caption:
    return Caption(_scene(rng, size)[0], PRETRAIN_CAPTION)


KIND = TaskKind(
    "grounded-caption",
    "caption",
    instruct,
    describe,
    words_of(PROMPTS, ("a", "an"), PALETTE, OBJECTS, RELATIONS.values(), PRETRAIN_CAPTION),
)
