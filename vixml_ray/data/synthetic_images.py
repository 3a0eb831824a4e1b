"""Images of the synthetic data: each shows an ATTRIBUTE as a global background colour plus a large shape.

Both survive a frozen vision tower with random weights (a random patch embedding is still a linear map of the pixels,
so the mean colour of the image moves its pooled output), with per-image jitter of colour, shape size and position
and Gaussian pixel noise so that no two images are identical. Rendering is a pure function of
(attribute, size, rng), so the same seed gives the same pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

# name -> RGB; the attribute index picks the colour (distinct per attribute) and, cyclically, the shape.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (210, 40, 40)),
    ("green", (40, 170, 60)),
    ("blue", (40, 70, 210)),
    ("yellow", (235, 215, 50)),
    ("purple", (130, 50, 170)),
    ("orange", (240, 140, 30)),
    ("cyan", (50, 200, 210)),
    ("pink", (240, 130, 190)),
    ("brown", (120, 75, 35)),
    ("grey", (128, 128, 128)),
    ("black", (20, 20, 20)),
    ("white", (240, 240, 240)),
)
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOUR_JITTER = 12
PIXEL_NOISE = 6.0


def attribute_name(attribute: int) -> str:
    """The words that name an attribute in label texts, e.g. ``"red circle"``."""
    return f"{COLOURS[attribute][0]} {SHAPES[attribute % len(SHAPES)]}"


def attribute_words() -> set[str]:
    """Every word any attribute name can use (none of them may appear in an item text)."""
    return {name for name, _ in COLOURS} | set(SHAPES)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(attribute: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image [size, size, 3] showing ``attribute``."""
    base = np.array(COLOURS[attribute][1], dtype=np.int64)
    bg = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    fg = (20, 20, 20) if luminance > 140 else (235, 235, 235)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    r = size * rng.uniform(0.28, 0.42)
    cx, cy = size / 2 + size * rng.uniform(-0.08, 0.08, size=2)
    _draw_shape(ImageDraw.Draw(img), SHAPES[attribute % len(SHAPES)], cx, cy, r, fg)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, PIXEL_NOISE, size=(size, size, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """PNG (lossless) or JPEG (quality 90) bytes of an RGB image."""
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    elif fmt == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()
