"""One index shard: label rows ``[lo, hi)`` of one committed version, loaded from storage, searched with FAISS.

Run as a Ray actor by :class:`vixml_ray.index.sharded.ShardedIndex`; a restarted actor re-runs ``__init__`` and so
reloads its rows from the (immutable) version directory.
"""

from __future__ import annotations

import os
import time
from typing import Any

import faiss
import numpy as np
import psutil
import ray

from vixml_ray.config import IndexConfig
from vixml_ray.index.faiss_index import build_index, search_sorted
from vixml_ray.index.versions import read_manifest, read_rows


class IndexShard:
    """Holds a FAISS index over label rows ``[lo, hi)`` of ``version``; answers with global label ids."""

    def __init__(self, index_dir: str, version: str, lo: int, hi: int, cfg: IndexConfig):
        # Ray sets OMP_NUM_THREADS from the actor's num_cpus; a reused worker may have imported faiss before that.
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            faiss.omp_set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        start = time.perf_counter()
        self.version, self.lo, self.hi = version, lo, hi
        vectors = read_rows(index_dir, read_manifest(index_dir, version), lo, hi)
        loaded = time.perf_counter()
        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
        self.index = build_index(vectors, cfg, use_gpu=bool(gpus))
        self.stats = {
            "version": version,
            "lo": lo,
            "hi": hi,
            "ntotal": int(self.index.ntotal),
            "kind": cfg.kind,
            "gpus": [str(g) for g in gpus],
            "threads": faiss.omp_get_max_threads(),
            "load_s": loaded - start,
            "build_s": time.perf_counter() - loaded,
            "vector_bytes": int(vectors.nbytes),
        }

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Top-k (scores, global label ids, version) in (-score, id) order; -inf / -1 padding."""
        scores, ids = search_sorted(self.index, queries, k)
        return scores, np.where(ids >= 0, ids + self.lo, -1), self.version

    def info(self) -> dict[str, Any]:
        """Shard statistics, including this process's resident memory."""
        return {**self.stats, "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss}
