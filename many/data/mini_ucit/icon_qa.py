"""icon-qa, the IconQA analogue (docs/design.md §7): a 3×3 grid of small icons on pastel card, asking either
how many icons there are (→ a digit) or which icon is missing from a row pattern (→ the icon's name)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from many.data.draw import PALETTE, draw_shape, jitter, pick, textured, to_image
from many.data.mini_ucit.kind import Caption, Example, Generator, TaskKind
from many.data.mini_ucit.text import words_of

CELLS = 3
ICONS = ("circle", "square", "triangle", "cross")
CARDS = ((200, 236, 214), (226, 214, 242), (250, 222, 200))  # mint, lavender, peach
COUNT_PROMPT = "how many icons are in the grid? answer with a number."
MISSING_PROMPT = "which icon is missing from the grid? choose: {options}."
PRETRAIN_CAPTION = "a grid of icons"
COUNTS = tuple(range(1, CELLS * CELLS + 1))

def _card(rng: Generator, size: int) -> tuple[Image.Image, float]:
    card = jitter(rng, CARDS[int(rng.integers(len(CARDS)))], 10)
    pixels = textured(rng, size, card, noise=3.0)
    step = size / CELLS
    for k in range(1, CELLS):
        edge = int(round(k * step))
        pixels[edge, :] *= 0.7
        pixels[:, edge] *= 0.7
    return to_image(pixels), step

def _icon(draw: ImageDraw.ImageDraw, icon: str, cell: int, step: float, colour: tuple[int, int, int]) -> None:
    centre = ((cell % CELLS + 0.5) * step, (cell // CELLS + 0.5) * step)
    draw_shape(draw, icon, centre, step * 0.33, fill=colour)

def _count(rng: Generator, size: int) -> tuple[Image.Image, str]:
    image, step = _card(rng, size)
    icon, colour = pick(rng, ICONS), PALETTE[pick(rng, tuple(PALETTE))]
    count = int(rng.choice(COUNTS))
    draw = ImageDraw.Draw(image)
    for cell in rng.choice(CELLS * CELLS, size=count, replace=False):
        _icon(draw, icon, int(cell), step, jitter(rng, colour, 12))
    return image, str(count)

def _missing(rng: Generator, size: int) -> tuple[Image.Image, list[str], str]:
    """Each row repeats one icon; one cell is left empty, and its row's icon is the answer."""
    image, step = _card(rng, size)
    rows = [str(icon) for icon in rng.choice(ICONS, size=CELLS, replace=False)]
    colours = [PALETTE[str(c)] for c in rng.choice(list(PALETTE), size=CELLS, replace=False)]
    empty = int(rng.integers(CELLS * CELLS))
    draw = ImageDraw.Draw(image)
    for cell in range(CELLS * CELLS):
        if cell != empty:
            _icon(draw, rows[cell // CELLS], cell, step, jitter(rng, colours[cell // CELLS], 12))
    return image, rows, rows[empty // CELLS]

def instruct(rng: Generator, size: int) -> Example:
    if rng.random() < 0.5:
        image, count = _count(rng, size)
        return Example(image, COUNT_PROMPT, count)
    image, rows, missing = _missing(rng, size)
    options = ", ".join(rows[int(k)] for k in rng.permutation(CELLS))
    return Example(image, MISSING_PROMPT.format(options=options), missing)

def describe(rng: Generator, size: int) -> Caption:
    image = _count(rng, size)[0] if rng.random() < 0.5 else _missing(rng, size)[0]
    return Caption(image, PRETRAIN_CAPTION)

KIND = TaskKind(
    "icon-qa",
    "exact_match",
    instruct,
    describe,
    words_of(COUNT_PROMPT, MISSING_PROMPT, ICONS, [str(n) for n in COUNTS], PRETRAIN_CAPTION),
)
