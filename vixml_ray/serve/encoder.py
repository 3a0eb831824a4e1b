"""The query encoder as a Ray Serve deployment: the trained model and (image models) the vision tower, embedding
the queries of concurrent requests together (``@serve.batch``, sized by ``serve.max_batch_size`` and
``serve.batch_wait_timeout_s``). It receives image bytes only (the ingress reads them, see
:mod:`vixml_ray.serve.images`), so it touches neither the network nor the filesystem for a request."""

from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np
import torch
from ray import serve

from vixml_ray.config import Config, replace
from vixml_ray.inference.export import read_export
from vixml_ray.predict.predictor import Query, QueryEncoder

EncodedQueries = tuple[np.ndarray, list[list[str | None]]]  # unit embeddings [n, hidden], per-image errors


class Encoder:
    """Embeds ``(text, image bytes)`` queries; one replica per ``serve.encoder_*`` setting."""

    def __init__(self, export_uri: str, cfg: Config):
        if cfg.serve.encoder_num_gpus == 0:
            torch.set_num_threads(max(1, int(cfg.serve.encoder_num_cpus)))
        gpus = cfg.serve.encoder_num_gpus  # the model and the vision tower go where this replica's GPU share is
        cfg = replace(cfg, **{"infer.num_gpus_per_actor": gpus, "vision.num_gpus_per_actor": gpus})
        self.export = read_export(export_uri)
        self.encoder = QueryEncoder(self.export, cfg)
        self.embed.set_max_batch_size(cfg.serve.max_batch_size)
        self.embed.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    @serve.batch
    async def embed(self, requests: list[Sequence[tuple[str, Sequence[bytes]]]]) -> list[EncodedQueries]:
        """One request's queries ``[(text, [image bytes, ...]), ...]`` -> their embeddings and image errors."""
        queries = [Query(text, tuple(images)) for request in requests for text, images in request]
        embeddings, errors = await asyncio.to_thread(self.encoder.embed, queries)
        out, at = [], 0
        for request in requests:
            out.append((embeddings[at: at + len(request)], errors[at: at + len(request)]))
            at += len(request)
        return out

    def fingerprint(self) -> str:
        """The export this replica serves (health checks call it)."""
        return self.export.fingerprint
