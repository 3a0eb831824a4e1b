"""Image bytes -> an RGB ``PIL.Image``, or the reason it cannot be one.

Reasons (counted by the embedding job, stored in the feature cache's ``reason`` column): ``empty`` (zero bytes),
``corrupt`` (not a decodable image), ``truncated`` (the data ends early, e.g. a cut-off JPEG) and ``too_large``
(over Pillow's decompression-bomb limit). Images that decode but are not RGB are converted and their source mode
reported: transparency (RGBA, LA, PA, palette with a transparent colour) is composited onto white, as product
photos are shown; 16-bit greyscale is scaled to 8 bits; CMYK, greyscale, palette and the other modes go through Pillow's
``convert("RGB")``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

WHITE = (255, 255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass
class Decoded:
    """An RGB image, or ``image=None`` and a ``reason``; ``converted_from`` is the source mode when it was not RGB."""

    image: Optional[Image.Image]
    reason: Optional[str] = None
    converted_from: Optional[str] = None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or "transparency" in img.info  # the latter: a transparent palette/grey/RGB colour


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an RGB image, transparent parts composited onto white, 16-bit greyscale scaled to 8 bits."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I"):  # 16/32-bit integer greyscale: Pillow's convert() would clip it at 255
        pixels = np.asarray(img, dtype=np.int64)
        if pixels.max(initial=0) > 255:
            pixels = pixels >> 8
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")
    if _has_alpha(img):
        background = Image.new("RGBA", img.size, WHITE)
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Decoded:
    """Decodes ``data`` fully (so truncation is detected here, not later) and converts it to RGB."""
    if len(data) == 0:
        return Decoded(None, "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        mode = img.mode
        rgb = to_rgb(img)
    except Image.DecompressionBombError:
        return Decoded(None, "too_large")
    except UnidentifiedImageError:
        return Decoded(None, "corrupt")
    except Exception as err:  # noqa: BLE001 - Pillow's format plugins raise many types on malformed bytes
        return Decoded(None, "truncated" if "truncated" in str(err).lower() else "corrupt")
    if rgb.width == 0 or rgb.height == 0:
        return Decoded(None, "corrupt")
    return Decoded(rgb, None, None if mode == "RGB" and rgb is img else mode)
