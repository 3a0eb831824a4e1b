"""One index shard: a row range ``[lo, hi)`` of each served part (labels, and the training queries for
retrieval-augmented inference) of one committed version, loaded from storage, searched with FAISS.

Run as a Ray actor by :class:`vixml_ray.index.sharded.ShardedIndex`; a restarted actor re-runs ``__init__`` and so
reloads its rows of every part from the (immutable) version directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import faiss
import numpy as np
import psutil
import ray

from vixml_ray.config import IndexConfig
from vixml_ray.index.faiss_index import build_index, search_sorted, vectors_of
from vixml_ray.index.versions import LABELS, read_manifest, read_rows

PAIR_CHUNK = 16384  # (query, row) pairs scored per step of pair_scores


@dataclass
class _Part:
    index: faiss.Index
    lo: int
    hi: int
    host: np.ndarray | None  # the vectors, kept on the host only when the index lives on a GPU
    stats: dict[str, Any]


class IndexShard:
    """Holds a FAISS index over rows ``ranges[part] = (lo, hi)`` of each part of ``version``; answers with global
    row ids (label rows, or train rows for the ``queries`` part)."""

    def __init__(self, index_dir: str, version: str, ranges: Mapping[str, tuple[int, int]], cfg: IndexConfig):
        # Ray sets OMP_NUM_THREADS from the actor's num_cpus; a reused worker may have imported faiss before that.
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            faiss.omp_set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        self.version = version
        manifest = read_manifest(index_dir, version)
        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
        self.parts: dict[str, _Part] = {}
        for part, (lo, hi) in ranges.items():
            start = time.perf_counter()
            vectors = read_rows(index_dir, manifest, lo, hi, part)
            loaded = time.perf_counter()
            index = build_index(vectors, cfg, use_gpu=bool(gpus))
            self.parts[part] = _Part(index, lo, hi, vectors if gpus else None, {
                "lo": lo, "hi": hi, "ntotal": int(index.ntotal), "load_s": loaded - start,
                "build_s": time.perf_counter() - loaded, "vector_bytes": int(vectors.nbytes)})
        self.stats = {"version": version, "kind": cfg.kind, "gpus": [str(g) for g in gpus],
                      "threads": faiss.omp_get_max_threads()}

    def _part(self, part: str) -> _Part:
        if part not in self.parts:
            raise ValueError(f"this shard serves the parts {sorted(self.parts)} of {self.version}, not {part!r}")
        return self.parts[part]

    def search(self, queries: np.ndarray, k: int, part: str = LABELS) -> tuple[np.ndarray, np.ndarray, str]:
        """Top-k (scores, global row ids, version) of ``part`` in (-score, id) order; -inf / -1 padding."""
        held = self._part(part)
        scores, ids = search_sorted(held.index, queries, k)
        return scores, np.where(ids >= 0, ids + held.lo, -1), self.version

    def pair_scores(self, queries: np.ndarray, rows: np.ndarray, ids: np.ndarray, part: str = LABELS
                    ) -> tuple[np.ndarray, str]:
        """(inner products of ``queries[rows[i]]`` with the vector of global row ``ids[i]`` (float32), version);
        every id must lie in this shard's range of ``part``."""
        held = self._part(part)
        local = np.asarray(ids, dtype=np.int64) - held.lo
        if len(local) and (local.min() < 0 or local.max() >= held.hi - held.lo):
            raise ValueError(f"{part} ids outside this shard's rows [{held.lo}, {held.hi})")
        queries, rows = np.asarray(queries, dtype=np.float32), np.asarray(rows, dtype=np.int64)
        out = np.empty(len(local), dtype=np.float32)
        for at in range(0, len(local), PAIR_CHUNK):  # bounded memory: a chunk of gathered vectors at a time
            chunk = slice(at, at + PAIR_CHUNK)
            vectors = held.host[local[chunk]] if held.host is not None else vectors_of(held.index, local[chunk])
            out[chunk] = np.einsum("ij,ij->i", queries[rows[chunk]], vectors)
        return out, self.version

    def info(self) -> dict[str, Any]:
        """Shard statistics: the label part's at the top level (rows, load/build seconds, vector bytes), every
        part's under ``parts``, and this process's resident memory."""
        labels = self.parts[LABELS].stats if LABELS in self.parts else {}
        return {**self.stats, **labels, "parts": {p: held.stats for p, held in self.parts.items()},
                "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss}
