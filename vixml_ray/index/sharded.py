"""A label index split over S Ray actors: fan a query batch out, merge the per-shard top-k exactly, swap versions.

Exactness: every shard returns its top-k in (-score, id) order (ties included, see
:func:`vixml_ray.index.faiss_index.search_sorted`), so the merged top-k equals one index over all labels.

Versions: the index serves one committed version at a time. :meth:`ShardedIndex.swap` loads the new version's
shards on fresh actors first, then switches with one reference assignment; a query batch is answered entirely by
the generation it started on (its version is in the result), and the old actors are killed once their in-flight
queries have finished.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import ray

from vixml_ray.config import IndexConfig
from vixml_ray.eval.metrics import filter_predictions
from vixml_ray.index.merge import merge_topk
from vixml_ray.index.shard import IndexShard
from vixml_ray.index.versions import Manifest, read_manifest


_RemoteShard = ray.remote(IndexShard)


class SearchResult(NamedTuple):
    scores: np.ndarray  # (nq, k) float32, best first; -inf where fewer than k labels remain
    ids: np.ndarray  # (nq, k) int64 label rows; -1 where fewer than k labels remain
    version: str  # the index version that answered the whole batch


def shard_bounds(num_labels: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous label-row ranges ``[lo, hi)`` of near-equal size; empty ranges when shards outnumber labels."""
    edges = [i * num_labels // num_shards for i in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


@dataclass
class _Generation:
    manifest: Manifest
    actors: list[Any]
    inflight: int = 0


class ShardedIndex:
    """Serves one committed version of ``index_dir`` from ``cfg.num_shards`` shard actors (needs Ray initialised).

    ``version`` None = the version ``CURRENT`` points at.
    """

    def __init__(self, index_dir: str, cfg: IndexConfig, version: str | None = None):
        self.index_dir = index_dir
        self.cfg = cfg
        self._cond = threading.Condition()
        self._swap_lock = threading.Lock()
        self._gen: _Generation | None = self._start(version)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _start(self, version: str | None) -> _Generation:
        manifest = read_manifest(self.index_dir, version)
        remote = _RemoteShard.options(
            num_cpus=self.cfg.cpus_per_shard,
            num_gpus=1 if self.cfg.use_gpu else 0,
            max_restarts=self.cfg.max_restarts,
            max_task_retries=self.cfg.max_task_retries,
        )
        actors = [remote.remote(self.index_dir, manifest.version, lo, hi, self.cfg)
                  for lo, hi in shard_bounds(manifest.num_labels, self.cfg.num_shards)]
        try:  # loaded and built, or the construction error (e.g. a missing file) surfaces here
            ray.get([a.info.remote() for a in actors], timeout=self.cfg.load_timeout_s)
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            raise
        return _Generation(manifest, actors)

    def _active(self) -> _Generation:
        if self._gen is None:
            raise RuntimeError("the index is closed")
        return self._gen

    def swap(self, version: str | None = None) -> str:
        """Switches to ``version`` (None: the current pointer) without failing in-flight queries; returns it.

        The new shards are loaded before the switch; if loading fails, the old version keeps serving.
        """
        with self._swap_lock:
            new = self._start(version)
            with self._cond:
                old, self._gen = self._gen, new
            self._retire(old)
            return new.manifest.version

    def _retire(self, gen: _Generation | None) -> None:
        if gen is None:
            return
        with self._cond:
            self._cond.wait_for(lambda: gen.inflight == 0)
        for actor in gen.actors:
            ray.kill(actor)

    def close(self) -> None:
        """Kills the shard actors (after in-flight queries finish)."""
        with self._swap_lock:
            with self._cond:
                old, self._gen = self._gen, None
            self._retire(old)

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- queries
    @property
    def version(self) -> str:
        return self._active().manifest.version

    @property
    def manifest(self) -> Manifest:
        return self._active().manifest

    @property
    def actors(self) -> list[Any]:
        """The current generation's shard actor handles (in label-row order)."""
        return list(self._active().actors)

    def info(self) -> list[dict[str, Any]]:
        """Per-shard statistics (rows, load/build seconds, memory)."""
        return ray.get([a.info.remote() for a in self.actors])

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> SearchResult:
        """Exact (for ``kind=flat``) top-k labels of each query row, best first, ties by label id.

        ``exclude``: (m, 2) pairs (query row in this batch, label) never returned; the shards retrieve
        ``k + max exclusions per row`` candidates so that k labels remain.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        pairs = None
        fetch = k
        if exclude is not None and len(exclude):
            pairs = np.unique(np.asarray(exclude, dtype=np.int64).reshape(-1, 2), axis=0)
            if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= len(queries):
                raise ValueError(f"exclude rows must index this batch of {len(queries)} queries")
            fetch = k + int(np.bincount(pairs[:, 0]).max())
        with self._cond:
            gen = self._active()
            gen.inflight += 1
        try:
            if queries.ndim != 2 or queries.shape[1] != gen.manifest.dim:
                raise ValueError(f"queries must be (n, {gen.manifest.dim}) for version {gen.manifest.version}, "
                                 f"got {queries.shape}")
            ref = ray.put(queries)
            parts = ray.get([a.search.remote(ref, fetch) for a in gen.actors])
        finally:
            with self._cond:
                gen.inflight -= 1
                self._cond.notify_all()
        versions = {p[2] for p in parts}
        if versions != {gen.manifest.version}:
            raise RuntimeError(f"shards answered from versions {sorted(versions)}, expected {gen.manifest.version}")
        scores, ids = merge_topk([(p[0], p[1]) for p in parts], fetch)
        if pairs is not None:
            ids, scores = filter_predictions(ids, scores, pairs)
        return SearchResult(scores[:, :k], ids[:, :k], gen.manifest.version)
