"""Pretraining-only images (docs/design.md §7): one shape on a plain backdrop, captioned "a red circle on a blue
background", so the base learns colour and shape words before any task arrives."""

from __future__ import annotations

from PIL import ImageDraw

from many.data.draw import PALETTE, RGB, SHAPES, draw_shape, jitter, pick, textured, to_image
from many.data.mini_ucit.kind import Caption, Generator
from many.data.mini_ucit.text import article, words_of

BACKDROPS: dict[str, RGB] = {**PALETTE, "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
CAPTION = "{article} {colour} {shape} on a {backdrop} background"


def describe(rng: Generator, size: int) -> Caption:
    colour, shape = pick(rng, tuple(PALETTE)), pick(rng, SHAPES)
    backdrop = pick(rng, tuple(name for name in BACKDROPS if name != colour))
    image = to_image(textured(rng, size, jitter(rng, BACKDROPS[backdrop], 12), noise=4.0))
    centre = (size / 2 + rng.uniform(-0.2, 0.2) * size, size / 2 + rng.uniform(-0.2, 0.2) * size)
    radius = rng.uniform(0.18, 0.3) * size
    fill, angle = jitter(rng, PALETTE[colour], 15), float(rng.uniform(-20, 20))
    draw_shape(ImageDraw.Draw(image), shape, centre, radius, fill=fill, angle_deg=angle)
    return Caption(image, CAPTION.format(article=article(colour), colour=colour, shape=shape, backdrop=backdrop))


WORDS = words_of(CAPTION, ("a", "an"), BACKDROPS, SHAPES)
