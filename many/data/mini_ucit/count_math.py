"""count-math, the CLEVR-Math analogue (docs/design.md §7): a few objects on a grey studio floor; "subtract all red
objects. how many objects are left?" → a number word."""

from __future__ import annotations

from PIL import Image, ImageDraw

from many.data.draw import PALETTE, cell_centres, draw_shape, gradient, jitter, pick, to_image
from many.data.mini_ucit.kind import Caption, Example, Generator, TaskKind
from many.data.mini_ucit.text import NUMBER_WORDS, words_of

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles"}  # shape → plural
MIN_OBJECTS, MAX_OBJECTS = 3, 5
PROMPT = "{verb} all {group}. how many objects are left?"
VERBS = ("subtract", "remove")
PRETRAIN_CAPTION = "some objects on a gray floor"
ABSENT_RATE = 0.15  # questions whose group is absent from the scene: the answer is the total


def _scene(rng: Generator, size: int) -> tuple[Image.Image, list[tuple[str, str]]]:
    floor = int(rng.integers(105, 135))
    pixels = gradient(size, jitter(rng, (floor,) * 3, 6), jitter(rng, (floor + 45,) * 3, 6))
    image = to_image(pixels + rng.normal(0.0, 4.0, size=(size, size, 1)))
    draw = ImageDraw.Draw(image)
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    objects = [(pick(rng, COLOURS), pick(rng, tuple(SHAPES))) for _ in range(count)]
    for (colour, shape), centre in zip(objects, cell_centres(rng, size, cells=4, count=count)):
        draw_shape(draw, shape, centre, size * 0.11, fill=jitter(rng, PALETTE[colour], 15))
    return image, objects


def instruct(rng: Generator, size: int) -> Example:
    image, objects = _scene(rng, size)
    by_colour = rng.random() < 0.5
    present = sorted({colour if by_colour else shape for colour, shape in objects})
    everything = COLOURS if by_colour else tuple(SHAPES)
    absent = [value for value in everything if value not in present]
    value = pick(rng, absent) if absent and rng.random() < ABSENT_RATE else pick(rng, present)
    removed = [obj for obj in objects if (obj[0] if by_colour else obj[1]) == value]
    group = f"{value} objects" if by_colour else SHAPES[value]
    prompt = PROMPT.format(verb=pick(rng, VERBS), group=group)
    return Example(image, prompt, NUMBER_WORDS[len(objects) - len(removed)])


def describe(rng: Generator, size: int) -> Caption:
    return Caption(_scene(rng, size)[0], PRETRAIN_CAPTION)


KIND = TaskKind(
    "count-math",
    "exact_match",
    instruct,
    describe,
    words_of(PROMPT, VERBS, COLOURS, SHAPES.values(), NUMBER_WORDS[: MAX_OBJECTS + 1], PRETRAIN_CAPTION),
)
