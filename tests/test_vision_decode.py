"""Image bytes -> RGB or a counted reason: every kind of bad input a catalogue has."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vixml_ray.vision.decode import decode_rgb


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 48)[None, :, None] * np.ones((40, 48, 3))
    return Image.fromarray(np.clip(gradient + rng.normal(0, 3, gradient.shape), 0, 255).astype(np.uint8))


def test_rgb_png_and_jpeg_decode_unchanged(photo):
    png = decode_rgb(_encode(photo, "PNG"))
    assert png.reason is None and png.converted_from is None
    assert np.array_equal(np.asarray(png.image), np.asarray(photo))
    jpg = decode_rgb(_encode(photo, "JPEG", quality=95))
    assert jpg.image.mode == "RGB" and jpg.image.size == (48, 40)
    assert np.abs(np.asarray(jpg.image, dtype=float) - np.asarray(photo, dtype=float)).mean() < 4


@pytest.mark.parametrize("kind, reason", [("empty", "empty"), ("garbage", "corrupt"), ("header_only", "corrupt"),
                                          ("truncated_jpeg", "truncated"), ("truncated_png", "truncated")])
def test_bad_bytes_give_a_reason(photo, kind, reason):
    jpeg, png = _encode(photo, "JPEG"), _encode(photo, "PNG")
    data = {"empty": b"", "garbage": b"not an image at all" * 8, "header_only": jpeg[:20],
            "truncated_jpeg": jpeg[: len(jpeg) // 2], "truncated_png": png[: len(png) // 2]}[kind]
    decoded = decode_rgb(data)
    assert decoded.image is None and decoded.reason == reason


def test_cmyk_palette_and_grey_are_converted(photo):
    for mode, fmt in (("CMYK", "JPEG"), ("P", "PNG"), ("L", "PNG")):
        decoded = decode_rgb(_encode(photo.convert(mode), fmt))
        assert decoded.reason is None and decoded.converted_from == mode and decoded.image.mode == "RGB"
        error = np.abs(np.asarray(decoded.image, dtype=float).mean(axis=2) - np.asarray(photo.convert("L"))).mean()
        assert error < 20, mode  # the picture survives the conversion


def test_transparency_is_composited_on_white(photo):
    rgba = photo.convert("RGBA")
    alpha = np.full((40, 48), 255, dtype=np.uint8)
    alpha[:, :10] = 0  # a transparent band on the left
    rgba.putalpha(Image.fromarray(alpha))
    decoded = decode_rgb(_encode(rgba, "PNG"))
    assert decoded.converted_from == "RGBA"
    pixels = np.asarray(decoded.image)
    assert (pixels[:, :10] == 255).all()
    assert np.array_equal(pixels[:, 10:], np.asarray(photo)[:, 10:])

    palette = photo.convert("P")
    transparent_index = np.asarray(palette)[0, 0]
    decoded = decode_rgb(_encode(palette, "PNG", transparency=int(transparent_index)))
    assert decoded.converted_from == "P" and (np.asarray(decoded.image)[0, 0] == 255).all()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64).astype(np.uint16)[None, :] * np.ones((8, 1), dtype=np.uint16))
    decoded = decode_rgb(_encode(Image.fromarray(ramp), "PNG"))
    assert decoded.converted_from.startswith("I")
    grey = np.asarray(decoded.image)[..., 0]
    assert grey[0, 0] == 0 and grey[0, -1] == 255 and 120 < grey[0, 32] < 136
