"""Online image features: raw images -> exactly what the feature cache holds for them.

Queries at serving time bring raw images (bytes, local paths, ``pyarrow.fs`` URIs or HTTP(S) URLs) instead of
feature-cache rows. They go through the same steps as ``jobs/embed_images.py`` (read with the same
:class:`~vixml_ray.vision.fetch.Fetcher`, :func:`~vixml_ray.vision.decode.decode_rgb`, the backend's preprocessing,
the frozen tower) and are rounded to the cache dtype, so the trained model sees the representation it was trained
on. An image that cannot be read or decoded leaves its slot masked, with its reason, like a bad image in the cache.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vixml_ray.config import VisionConfig
from vixml_ray.data.schema import MAX_IMAGES
from vixml_ray.vision.decode import decode_rgb
from vixml_ray.vision.fetch import FetchError, FetchOptions, Fetcher
from vixml_ray.vision.towers import load_preprocessor, load_tower

ImageInput = bytes | str  # raw bytes, or a path / URI / URL to read them from


class ImageFeaturizer:
    """``features(images per query)`` -> (float32 [n, 3, D], bool mask [n, 3], reason per given image or None)."""

    def __init__(self, vision: VisionConfig, fetch: FetchOptions):
        self.preprocess = load_preprocessor(vision)
        self.tower = load_tower(vision)
        self.cache_dtype = np.dtype(vision.cache_dtype)
        self.batch_size = vision.batch_size
        self.fetcher = Fetcher(fetch)

    @property
    def dim(self) -> int:
        return self.tower.dim

    def _read(self, items: list[ImageInput]) -> list[bytes | FetchError]:
        uris = [x for x in items if isinstance(x, str)]
        fetched = iter(self.fetcher.fetch_many(uris))
        return [bytes(x) if isinstance(x, (bytes, bytearray, memoryview)) else next(fetched) for x in items]

    def features(self, images: Sequence[Sequence[ImageInput]]) -> tuple[np.ndarray, np.ndarray, list[list[str | None]]]:
        for i, slots in enumerate(images):
            if len(slots) > MAX_IMAGES:
                raise ValueError(f"query {i}: {len(slots)} images, at most {MAX_IMAGES}")
        where = [(i, s) for i, slots in enumerate(images) for s in range(len(slots))]
        reasons: list[list[str | None]] = [[None] * len(slots) for slots in images]
        inputs, at = [], []
        for (i, s), payload in zip(where, self._read([x for slots in images for x in slots])):
            if isinstance(payload, FetchError):
                reasons[i][s] = payload.reason
                continue
            decoded = decode_rgb(payload)
            if decoded.image is None:
                reasons[i][s] = decoded.reason
                continue
            try:
                inputs.append(self.preprocess([decoded.image]))
                at.append((i, s))
            except Exception:  # noqa: BLE001 - third-party transforms on untrusted images: masked, not fatal
                reasons[i][s] = "preprocess_error"
        feats = np.zeros((len(images), MAX_IMAGES, self.dim), dtype=np.float32)
        mask = np.zeros((len(images), MAX_IMAGES), dtype=bool)
        for lo in range(0, len(inputs), self.batch_size):
            chunk = inputs[lo: lo + self.batch_size]
            vectors = self.tower.embed({k: np.concatenate([x[k] for x in chunk]) for k in chunk[0]})
            for (i, s), vector in zip(at[lo: lo + self.batch_size], vectors):
                if not np.isfinite(vector).all():
                    reasons[i][s] = "non_finite"
                    continue
                feats[i, s] = vector.astype(self.cache_dtype)  # the cache's rounding
                mask[i, s] = True
        return feats, mask, reasons
