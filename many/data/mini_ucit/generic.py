"""The generic half of the base's pretraining mixture (docs/design.md §7): short visual questions — colours, shapes,
counting, reading a character, yes/no, left/right — and a text-echo instruction, over visual content no mini-UCIT
task draws: shapes of their own (hexagon, pentagon, rectangle, arrow, oval, ring) and colours beyond the tasks'
palette, on two-tone diagonal backdrops. Like LLaVA's pretraining, it gives the base generic skills a task's LoRA
then adapts; no task's prompt appears.

The echo instruction ("repeat: …" → the text) cycles through `BYTE_COVER`, one character per UTF-8 lead
byte and every ASCII and continuation byte, so every byte token a UTF-8 string can produce is in the pretraining
text (its embedding and output rows are trained, not left at their random init) once 128 echo samples are drawn.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from many.data.draw import PALETTE, RGB, cell_centres, jitter, pick, shape_points, to_image
from many.data.mini_ucit.kind import Example, Generator
from many.data.mini_ucit.text import NUMBER_WORDS

SHAPES = {"hexagon": "hexagons", "pentagon": "pentagons", "rectangle": "rectangles", "arrow": "arrows",
          "oval": "ovals", "ring": "rings"}  # shape → plural; none of them is a task's (draw.SHAPES)
COLOURS: dict[str, RGB] = {**PALETTE, "pink": (245, 120, 190), "brown": (130, 75, 35), "cyan": (40, 205, 215),
                           "black": (20, 20, 20), "white": (250, 250, 250)}
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
MAX_COUNT = 6
ECHO_PROMPT = "repeat: {text}"
ECHO_LENGTH = 2  # characters per echo: one of the multi-byte ones and one ASCII


def _byte_cover() -> tuple[str, str]:
    """(ASCII 0x00–0x7F, multi-byte characters): every continuation byte 0x80–0xBF (U+0080–U+00BF) and one character
    per lead byte 0xC2–0xF4 (0xC0, 0xC1, 0xF5–0xFF never occur in UTF-8)."""
    multi = [chr(cp) for cp in range(0x80, 0xC0)]  # C2 80 … C2 BF
    multi += [chr((lead - 0xC0) << 6) for lead in range(0xC3, 0xE0)]  # lead bytes C3 … DF
    multi += [chr(0x800)] + [chr((lead - 0xE0) << 12) for lead in range(0xE1, 0xF0)]  # E0 … EF (0xD000: not a surrogate)
    multi += [chr(0x10000)] + [chr((lead - 0xF0) << 18) for lead in range(0xF1, 0xF5)]  # F0 … F4
    return "".join(chr(b) for b in range(0x80)), "".join(multi)


BYTE_COVER = _byte_cover()


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _backdrop(rng: Generator, size: int) -> np.ndarray:
    """A diagonal blend between two random light tones, float (size, size, 3)."""
    a, b = (rng.integers(150, 256, size=3).astype(np.float64) for _ in range(2))
    t = (np.arange(size)[:, None] + np.arange(size)[None, :]) / (2 * size - 2)  # (size, size)
    return (1 - t)[..., None] * a + t[..., None] * b + rng.normal(0.0, 3.0, size=(size, size, 1))


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, fill: RGB) -> None:
    cx, cy = centre
    if shape == "oval":
        draw.ellipse((cx - radius, cy - 0.55 * radius, cx + radius, cy + 0.55 * radius), fill=fill)
    elif shape == "ring":
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, outline=fill, width=max(1, round(radius / 2.5)))
    else:
        draw.polygon(shape_points(shape, cx, cy, radius, 0.0), fill=fill)


def _objects(rng: Generator, size: int, objects: list[tuple[str, str]], cells: int) -> Image.Image:
    """`objects` (colour, shape) in distinct cells of a cells×cells grid on a backdrop."""
    image = to_image(_backdrop(rng, size))
    draw = ImageDraw.Draw(image)
    for (colour, shape), centre in zip(objects, cell_centres(rng, size, cells=cells, count=len(objects))):
        _draw(draw, shape, centre, size * 0.4 / cells, jitter(rng, COLOURS[colour], 12))
    return image


def _one(rng: Generator) -> tuple[str, str]:
    return pick(rng, tuple(COLOURS)), pick(rng, tuple(SHAPES))


def colour(rng: Generator, size: int) -> Example:
    col, shape = _one(rng)
    prompt = pick(rng, (f"what colour is the {shape}?", "what colour is it?"))
    return Example(_objects(rng, size, [(col, shape)], cells=1), prompt, col)


def shape(rng: Generator, size: int) -> Example:
    col, shp = _one(rng)
    prompt = pick(rng, (f"what object is {col}?", "what object is this?"))
    return Example(_objects(rng, size, [(col, shp)], cells=1), prompt, shp)


def count(rng: Generator, size: int) -> Example:
    col, shp = _one(rng)
    n = int(rng.integers(1, MAX_COUNT + 1))
    image = _objects(rng, size, [(col, shp)] * n, cells=3)
    if rng.random() < 0.5:
        return Example(image, f"how many {SHAPES[shp]}?", NUMBER_WORDS[n])
    return Example(image, f"count the {SHAPES[shp]}.", str(n))


def read(rng: Generator, size: int) -> Example:
    character = pick(rng, tuple(CHARACTERS))
    image = to_image(_backdrop(rng, size))
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no antialiasing: pixels depend on the glyph alone
    font = _font(max(6, int(size * 0.75)))
    centre = (size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size)
    draw.text(centre, character, font=font, fill=jitter(rng, (25, 25, 25), 15), anchor="mm")
    return Example(image, pick(rng, ("what character is this?", "read the character.")), character)


def yes_no(rng: Generator, size: int) -> Example:
    """Two objects; asks whether a shape is there, or whether the first object has a colour: "yes" half the time."""
    objects = [_one(rng), _one(rng)]
    image = _objects(rng, size, objects, cells=2)
    yes = rng.random() < 0.5
    if rng.random() < 0.5:
        present = sorted({shp for _, shp in objects})
        asked = pick(rng, present if yes else [s for s in SHAPES if s not in present])
        return Example(image, f"is there {'an' if asked[0] in 'aeiou' else 'a'} {asked}?", "yes" if yes else "no")
    col, shp = objects[0]
    colours = {c for c, s in objects if s == shp}  # both objects may have this shape
    asked = col if yes else pick(rng, [c for c in COLOURS if c not in colours])
    return Example(image, f"is the {shp} {asked}?", "yes" if yes else "no")


def side(rng: Generator, size: int) -> Example:
    col, shp = _one(rng)
    right = rng.random() < 0.5
    image = to_image(_backdrop(rng, size))
    centre = ((0.72 if right else 0.28) * size + rng.uniform(-1, 1), rng.uniform(0.3, 0.7) * size)
    _draw(ImageDraw.Draw(image), shp, centre, size * 0.18, jitter(rng, COLOURS[col], 12))
    return Example(image, f"is the {shp} left or right?", "right" if right else "left")


def echo(rng: Generator, size: int, index: int) -> Example:
    """The `index`-th echo: BYTE_COVER's multi-byte character `index` and ASCII character `index` (cyclically), in a
    random order: 128 echoes cover every byte."""
    ascii_chars, multi = BYTE_COVER
    chars = [multi[index % len(multi)], ascii_chars[index % len(ascii_chars)]]
    text = "".join(chars[int(k)] for k in rng.permutation(ECHO_LENGTH))
    return Example(to_image(_backdrop(rng, size)), ECHO_PROMPT.format(text=text), text)


QUESTIONS: tuple[Callable[[Generator, int], Example], ...] = (colour, shape, count, read, yes_no, side)
