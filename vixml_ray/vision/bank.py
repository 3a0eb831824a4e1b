"""Image features for training and label refresh, memory-mapped from a dataset's feature cache.

``FeatureBank.open(dataset_uri)`` finds the cache through the dataset manifest's ``features`` map;
``bank.get(split, rows)`` returns a float32 ``[B, 3, D]`` tensor (zeros in empty slots) and a bool ``[B, 3]`` mask.
The arrays are ``np.load(mmap_mode="r")`` views: every process on a node shares them through the OS page cache and no
Python heap holds the cache. A bank pickles as its paths (Ray tasks and actors re-open the files). A cache on an
object store is copied once to a local directory first (memory-mapping needs local files).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Optional

import numpy as np
import torch

from vixml_ray import storage
from vixml_ray.data import schema
from vixml_ray.data.dataset import open_dataset
from vixml_ray.errors import IncompatibleArtifactError, MissingPathError
from vixml_ray.vision import cache


class FeatureBank:
    """Read-only, memory-mapped image features of every split of one dataset for one vision model."""

    def __init__(self, bank_dir: str, slug: str, dim: int, dtype: str):
        self.bank_dir = bank_dir
        self.slug = slug
        self.dim = int(dim)
        self.dtype = dtype
        self._index: dict[str, np.ndarray] = {}
        self._emb: dict[str, np.ndarray] = {}
        for split in schema.SPLITS:
            index_path = os.path.join(bank_dir, f"{split}_index.npy")
            if not os.path.exists(index_path):
                raise MissingPathError(index_path, f"feature bank {bank_dir} lacks {split}_index.npy")
            self._index[split] = np.load(index_path, mmap_mode="r")
            self._emb[split] = np.load(os.path.join(bank_dir, f"{split}_emb.npy"), mmap_mode="r")
            if self._emb[split].shape[1:] != (self.dim,):
                raise IncompatibleArtifactError(f"{bank_dir}/{split}_emb.npy: shape {self._emb[split].shape}, "
                                                f"expected [n, {dim}]")

    @classmethod
    def open(cls, dataset_uri: str, model_slug: Optional[str] = None) -> "FeatureBank":
        """The bank of ``model_slug`` (default: the dataset's only feature cache); a bank on an object store is
        copied once into a folder of the system temp dir named by its URI."""
        ds = open_dataset(dataset_uri)
        caches = ds.features()
        if model_slug is None:
            if len(caches) != 1:
                raise ValueError(f"{ds.uri}: {len(caches)} feature caches {sorted(caches)}; name one (model_slug)")
            model_slug = next(iter(caches))
        if model_slug not in caches:
            raise IncompatibleArtifactError(f"{ds.uri}: no feature cache {model_slug!r} (caches: {sorted(caches)}); "
                                            "run jobs/embed_images.py first")
        info = caches[model_slug]
        bank_uri = storage.resolve(storage.join(ds.uri, info["path"], cache.BANK_DIR))
        key = hashlib.sha256(bank_uri.encode("utf-8")).hexdigest()[:16]
        local = storage.local_copy(bank_uri, os.path.join(tempfile.gettempdir(), "vixml-feature-banks", key))
        return cls(local, model_slug, int(info["dim"]), str(info["dtype"]))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FeatureBank, (self.bank_dir, self.slug, self.dim, self.dtype))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self._index[s])}" for s in schema.SPLITS)
        return f"FeatureBank({self.slug!r}, dim={self.dim}, {sizes})"

    def num_rows(self, split: str) -> int:
        return int(self._check(split).shape[0])

    def _check(self, split: str) -> np.ndarray:
        if split not in self._index:
            raise ValueError(f"unknown split {split!r} (splits: {', '.join(schema.SPLITS)})")
        return self._index[split]

    def get(self, split: str, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Features float32 ``[B, 3, D]`` (zeros where there is no image) and mask bool ``[B, 3]`` of ``rows``."""
        index = self._check(split)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(index)):
            raise IndexError(f"{split} rows out of range 0..{len(index) - 1}")
        slots = np.asarray(index[rows])  # [B, 3]
        mask = slots >= 0
        feats = np.zeros((len(rows), schema.MAX_IMAGES, self.dim), dtype=np.float32)
        if mask.any():
            wanted = slots[mask]
            order = np.argsort(wanted)  # read the memory map in file order
            vectors = np.empty((len(wanted), self.dim), dtype=np.float32)
            vectors[order] = self._emb[split][wanted[order]]
            feats[mask] = vectors
        return torch.from_numpy(feats), torch.from_numpy(mask)
