"""The two Ray Data stages of the embedding pipeline.

* :func:`decode_batch` (CPU tasks): read the bytes of a batch of manifest rows, decode to RGB, run the backend's
  preprocessing; rows that fail get ``valid=False`` and a ``reason`` (and zero inputs, which the model never sees).
* :class:`EmbedActor` (actor pool): loads the frozen tower once, embeds the valid rows of each batch.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from vixml_ray.config import VisionConfig
from vixml_ray.vision.decode import decode_rgb
from vixml_ray.vision.fetch import FetchError, FetchOptions, fetcher
from vixml_ray.vision.towers import Preprocessor, load_tower

# columns that flow from the manifest through both stages to the writer
KEYS = ("split", "row", "uid", "slot", "shard", "pos")


def _blank_inputs(preprocess: Preprocessor) -> dict[str, np.ndarray]:
    """Zero inputs of one image (the shape the preprocessing produces), for rows that have no image."""
    out = preprocess([Image.new("RGB", (8, 8), (255, 255, 255))])
    return {k: np.zeros_like(v) for k, v in out.items()}


def _preprocess_each(preprocess: Preprocessor,
                     images: list[Image.Image]) -> list[Optional[dict[str, np.ndarray]]]:
    """Per-image preprocessing, an image's failure isolated to it (``None``)."""
    out = []
    for img in images:
        try:
            out.append(preprocess([img]))
        except Exception:  # noqa: BLE001 - third-party transforms on untrusted images; counted, not fatal
            out.append(None)
    return out


def decode_batch(batch: dict[str, np.ndarray], fetch: FetchOptions, preprocess: Preprocessor) -> dict[str, np.ndarray]:
    """Manifest rows -> model inputs plus ``valid``/``reason``/``converted`` per row."""
    n = len(batch["uri"])
    valid = np.zeros(n, dtype=bool)
    reason = np.full(n, "", dtype=object)
    converted = np.full(n, "", dtype=object)
    images: list[Image.Image] = []
    at: list[int] = []
    for i, payload in enumerate(fetcher(fetch).fetch_many([str(u) for u in batch["uri"]])):
        if isinstance(payload, FetchError):
            reason[i] = payload.reason
            continue
        decoded = decode_rgb(payload)
        if decoded.image is None:
            reason[i] = decoded.reason
            continue
        converted[i] = decoded.converted_from or ""
        images.append(decoded.image)
        at.append(i)

    blank = _blank_inputs(preprocess)
    inputs = {k: np.repeat(v, n, axis=0) for k, v in blank.items()}
    if images:
        try:
            parts = [preprocess(images)]
            ok = at
        except Exception:  # noqa: BLE001 - find the image(s) that broke the batch; the others go on
            each = _preprocess_each(preprocess, images)
            ok = [i for i, p in zip(at, each) if p is not None]
            parts = [p for p in each if p is not None]
            reason[[i for i, p in zip(at, each) if p is None]] = "preprocess_error"
        if ok:
            for k in inputs:
                inputs[k][ok] = np.concatenate([p[k] for p in parts])
            valid[ok] = True
    return {**{k: batch[k] for k in KEYS}, "valid": valid, "reason": reason, "converted": converted, **inputs}


class EmbedActor:
    """Holds one frozen tower; maps decoded batches to ``embedding`` [B, D] in the cache dtype."""

    def __init__(self, vision: VisionConfig, input_names: tuple[str, ...]):
        if vision.num_gpus_per_actor == 0:
            torch.set_num_threads(vision.actor_threads or max(1, int(vision.num_cpus_per_actor)))
        self.tower = load_tower(vision)
        self.input_names = input_names
        self.cache_dtype = np.dtype(vision.cache_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        valid = np.asarray(batch["valid"], dtype=bool).copy()
        reason = np.asarray(batch["reason"], dtype=object).copy()
        embedding = np.zeros((len(valid), self.tower.dim), dtype=self.cache_dtype)
        if valid.any():
            vectors = self.tower.embed({k: batch[k][valid] for k in self.input_names}).astype(self.cache_dtype)
            finite = np.isfinite(vectors).all(axis=1)  # NaN from the model, or overflow of a float16 cache
            rows = np.flatnonzero(valid)
            embedding[rows[finite]] = vectors[finite]
            valid[rows[~finite]] = False
            reason[rows[~finite]] = "non_finite"
        return {**{k: batch[k] for k in KEYS}, "valid": valid, "reason": reason, "converted": batch["converted"],
                "embedding": embedding}
