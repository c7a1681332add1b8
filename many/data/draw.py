"""Drawing primitives shared by the mini-UCIT generators (docs/design.md §7): a small palette, shapes legible at
32 px, textured backgrounds, and deterministic PNG encoding. PIL's ImageDraw does not antialias, and all
randomness comes from the caller's numpy Generator, so the same seed gives byte-identical images."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 215, 30),
    "purple": (150, 50, 190),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")


def png_bytes(image: Image.Image) -> bytes:
    """RGB PNG with fixed encoder settings and no metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def jitter(rng: np.random.Generator, colour: RGB, amount: int) -> RGB:
    """The colour shifted by up to ±amount per channel: one palette name covers a range of shades."""
    shifted = np.clip(np.array(colour) + rng.integers(-amount, amount + 1, size=3), 0, 255)
    return (int(shifted[0]), int(shifted[1]), int(shifted[2]))


def textured(rng: np.random.Generator, size: int, colour: RGB, noise: float) -> np.ndarray:
    """A flat colour with per-pixel Gaussian grain, float array (size, size, 3)."""
    return np.asarray(colour, dtype=np.float64) + rng.normal(0.0, noise, size=(size, size, 1))


def gradient(size: int, top: RGB, bottom: RGB) -> np.ndarray:
    """A vertical blend from `top` to `bottom`, float array (size, size, 3)."""
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    row = (1 - t) * np.asarray(top, dtype=np.float64) + t * np.asarray(bottom, dtype=np.float64)
    return np.broadcast_to(row, (size, size, 3)).copy()


def _star() -> tuple[tuple[float, float], ...]:
    angles = np.deg2rad(np.arange(10) * 36 - 90)
    return tuple((r * math.cos(a), r * math.sin(a)) for a, r in zip(angles, [1.0, 0.45] * 5))


_W = 0.35  # half-width of a cross arm
# Unit polygons (radius 1) of every shape but the circle.
UNIT_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "triangle": tuple((math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])),
    "square": ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),
    "diamond": ((0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)),  # tall rhombus: never a tilted square
    "cross": (
        (-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W),
        (_W, 1), (-_W, 1), (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W),
    ),
    "star": _star(),
    # shapes only the base's generic pretraining draws (many.data.mini_ucit.generic), never a task
    "hexagon": tuple((math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(6) * 60)),
    "pentagon": tuple((math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(5) * 72 - 90)),
    "rectangle": ((-1.0, -0.5), (1.0, -0.5), (1.0, 0.5), (-1.0, 0.5)),  # wide: never a square
    "arrow": ((-1.0, -0.25), (0.2, -0.25), (0.2, -0.7), (1.0, 0.0), (0.2, 0.7), (0.2, 0.25), (-1.0, 0.25)),
}


def shape_points(shape: str, cx: float, cy: float, radius: float, angle_deg: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` (every shape but the circle) centred at (cx, cy), rotated by angle_deg."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in UNIT_POLYGONS[shape]]


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    centre: tuple[float, float],
    radius: float,
    *,
    fill: RGB | None = None,
    outline: RGB | None = None,
    width: int = 1,
    angle_deg: float = 0.0,
) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill, outline=outline, width=width)
    else:
        draw.polygon(shape_points(shape, cx, cy, radius, angle_deg), fill=fill, outline=outline, width=width)


def cell_centres(rng: np.random.Generator, size: int, cells: int, count: int) -> list[tuple[float, float]]:
    """`count` distinct cells of a cells×cells grid over the image, each centre jittered by ±1 px: objects
    never overlap, so every one stays visible and countable at 32 px."""
    step = size / cells
    chosen = rng.choice(cells * cells, size=count, replace=False)
    return [
        (
            (int(k) % cells + 0.5) * step + float(rng.uniform(-1, 1)),
            (int(k) // cells + 0.5) * step + float(rng.uniform(-1, 1)),
        )
        for k in chosen
    ]
