"""An index split over S Ray actors: fan a query batch out, merge the per-shard top-k exactly, swap versions.

Parts: the index serves the label vectors of a version and, on request (``parts=("labels", "queries")``, for
retrieval-augmented inference), its training-query vectors too; shard ``i`` holds the ``i``-th row range of every
served part, so both parts share the actors, their restarts and their swaps.

Exactness: every shard returns its top-k in (-score, id) order (ties included, see
:func:`vixml_ray.index.faiss_index.search_sorted`), so the merged top-k equals one index over all rows.

Versions: the index serves one committed version at a time. :meth:`ShardedIndex.swap` loads the new version's
shards (all parts) on fresh actors first, then switches with one reference assignment; a query batch is answered
entirely by the generation it started on (its version is in the result), and the old actors are killed once their
in-flight queries have finished. :meth:`ShardedIndex.pinned` keeps one generation for several calls (a label search,
a training-query search and exact label scores of one batch all come from one version).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import ray

from vixml_ray.config import IndexConfig
from vixml_ray.data.filters import filter_predictions
from vixml_ray.errors import IncompatibleArtifactError
from vixml_ray.index.merge import merge_topk
from vixml_ray.index.shard import IndexShard
from vixml_ray.index.versions import LABELS, PARTS, Manifest, read_manifest


_RemoteShard = ray.remote(IndexShard)


class SearchResult(NamedTuple):
    scores: np.ndarray  # (nq, k) float32, best first; -inf where fewer than k rows remain
    ids: np.ndarray  # (nq, k) int64 rows (label rows, or train rows for the queries part); -1 where none remain
    version: str  # the index version that answered the whole batch


def shard_bounds(num_labels: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges ``[lo, hi)`` of near-equal size; empty ranges when shards outnumber rows."""
    edges = [i * num_labels // num_shards for i in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def exclusion_pairs(exclude: np.ndarray | None, num_queries: int) -> tuple[np.ndarray | None, int]:
    """The unique (query row in the batch, label) pairs of ``exclude`` and the most any row excludes (the extra
    candidates to fetch so that k remain); (None, 0) without exclusions."""
    if exclude is None or not len(exclude):
        return None, 0
    pairs = np.unique(np.asarray(exclude, dtype=np.int64).reshape(-1, 2), axis=0)
    if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= num_queries:
        raise ValueError(f"exclude rows must index this batch of {num_queries} queries")
    return pairs, int(np.bincount(pairs[:, 0]).max())


@dataclass
class Generation:
    manifest: Manifest
    actors: list[Any]
    edges: dict[str, np.ndarray]  # per part: shard i holds rows [edges[i], edges[i + 1])
    inflight: int = 0


class IndexView:
    """One generation of a :class:`ShardedIndex`, pinned by :meth:`ShardedIndex.pinned`: every call answers from
    the same version."""

    def __init__(self, gen: Generation):
        self._gen = gen

    @property
    def version(self) -> str:
        return self._gen.manifest.version

    @property
    def manifest(self) -> Manifest:
        return self._gen.manifest

    def _check(self, queries: np.ndarray, part: str) -> np.ndarray:
        if part not in self._gen.edges:
            raise ValueError(f"the index serves the parts {sorted(self._gen.edges)}, not {part!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"queries must be (n, {self.manifest.dim}) for version {self.version}, "
                             f"got {queries.shape}")
        return queries

    def _fanout(self, method: str, queries: np.ndarray, calls: dict[int, tuple[Any, ...]]) -> list[Any]:
        """``method(queries, *args)`` on shard ``s`` for every ``s: args`` of ``calls``, answers in that order (the
        queries are put in the object store once). A Ray Serve front end overrides this to call its deployments."""
        ref = ray.put(queries)
        return ray.get([getattr(self._gen.actors[s], method).remote(ref, *args) for s, args in calls.items()])

    def _versions(self, versions: set[str]) -> None:
        if versions and versions != {self.version}:
            raise RuntimeError(f"shards answered from versions {sorted(versions)}, expected {self.version}")

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None, part: str = LABELS
               ) -> SearchResult:
        """Exact (for ``kind=flat``) top-k rows of ``part`` for each query row, best first, ties by row id.

        ``exclude``: (m, 2) pairs (query row in this batch, row id) never returned; the shards retrieve
        ``k + max exclusions per row`` candidates so that k remain.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = self._check(queries, part)
        pairs, extra = exclusion_pairs(exclude, len(queries))
        fetch = k + extra
        parts = self._fanout("search", queries, {s: (fetch, part) for s in range(len(self._gen.edges[part]) - 1)})
        self._versions({p[2] for p in parts})
        scores, ids = merge_topk([(p[0], p[1]) for p in parts], fetch)
        if pairs is not None:
            ids, scores = filter_predictions(ids, scores, pairs)
        return SearchResult(scores[:, :k], ids[:, :k], self.version)

    def pair_scores(self, queries: np.ndarray, rows: np.ndarray, ids: np.ndarray, part: str = LABELS
                    ) -> np.ndarray:
        """Inner products (float32) of ``queries[rows[i]]`` with the stored vector of row ``ids[i]`` of ``part``,
        computed by the shards that hold them."""
        queries = self._check(queries, part)
        rows, ids = np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64)
        edges = self._gen.edges[part]
        if rows.shape != ids.shape or (len(ids) and (ids.min() < 0 or ids.max() >= edges[-1])):
            raise ValueError(f"pair_scores needs rows and {part} ids of one shape, ids in [0, {edges[-1]})")
        out = np.empty(len(ids), dtype=np.float32)
        shard = np.searchsorted(edges, ids, side="right") - 1
        asked = {int(s): np.flatnonzero(shard == s) for s in np.unique(shard)}
        answers = self._fanout("pair_scores", queries, {s: (rows[at], ids[at], part) for s, at in asked.items()})
        self._versions({version for _, version in answers})
        for at, (scores, _) in zip(asked.values(), answers):
            out[at] = scores
        return out


class ShardedIndex:
    """Serves ``parts`` of one committed version of ``index_dir`` from ``cfg.num_shards`` shard actors (needs Ray
    initialised). ``version`` None = the version ``CURRENT`` points at; every version served must hold the parts."""

    def __init__(self, index_dir: str, cfg: IndexConfig, version: str | None = None,
                 parts: Sequence[str] = (LABELS,)):
        unknown = [p for p in parts if p not in PARTS]
        if LABELS not in parts or unknown:
            raise ValueError(f"parts must include {LABELS!r} and come from {PARTS}, got {tuple(parts)}")
        self.index_dir = index_dir
        self.cfg = cfg
        self.parts = tuple(dict.fromkeys(parts))
        self._cond = threading.Condition()
        self._swap_lock = threading.Lock()
        self._gen: Generation | None = self._start(version)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _start(self, version: str | None) -> Generation:
        manifest = read_manifest(self.index_dir, version)
        missing = [p for p in self.parts if not manifest.has_part(p)]
        if missing:
            raise IncompatibleArtifactError(f"index version {manifest.version} of {self.index_dir} holds no {missing} "
                                            "part (training-query embeddings are written by refresh_labels with "
                                            "'infer.raa.enabled'=true)")
        bounds = {p: shard_bounds(manifest.num_rows(p), self.cfg.num_shards) for p in self.parts}
        remote = _RemoteShard.options(
            num_cpus=self.cfg.cpus_per_shard,
            num_gpus=1 if self.cfg.use_gpu else 0,
            max_restarts=self.cfg.max_restarts,
            max_task_retries=self.cfg.max_task_retries,
        )
        actors = [remote.remote(self.index_dir, manifest.version, {p: bounds[p][i] for p in self.parts}, self.cfg)
                  for i in range(self.cfg.num_shards)]
        try:  # loaded and built, or the construction error (e.g. a missing file) surfaces here
            ray.get([a.info.remote() for a in actors], timeout=self.cfg.load_timeout_s)
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            raise
        edges = {p: np.array([lo for lo, _ in b] + [b[-1][1]], dtype=np.int64) for p, b in bounds.items()}
        return Generation(manifest, actors, edges)

    def _active(self) -> Generation:
        if self._gen is None:
            raise RuntimeError("the index is closed")
        return self._gen

    def swap(self, version: str | None = None) -> str:
        """Switches to ``version`` (None: the current pointer) without failing in-flight queries; returns it.

        The new shards (every served part) are loaded before the switch; if loading fails, the old version keeps
        serving.
        """
        with self._swap_lock:
            new = self._start(version)
            with self._cond:
                old, self._gen = self._gen, new
            self._retire(old)
            return new.manifest.version

    def _retire(self, gen: Generation | None) -> None:
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
        """The current generation's shard actor handles (in row order)."""
        return list(self._active().actors)

    def info(self) -> list[dict[str, Any]]:
        """Per-shard statistics (rows, load/build seconds, memory; per part under ``parts``)."""
        return ray.get([a.info.remote() for a in self.actors])

    @contextlib.contextmanager
    def pinned(self) -> Iterator[IndexView]:
        """The current generation for the block: its calls all answer from one version, and a concurrent
        :meth:`swap` retires that generation only after the block ends."""
        with self._cond:
            gen = self._active()
            gen.inflight += 1
        try:
            yield IndexView(gen)
        finally:
            with self._cond:
                gen.inflight -= 1
                self._cond.notify_all()

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None, part: str = LABELS
               ) -> SearchResult:
        """Exact (for ``kind=flat``) top-k rows of ``part`` of each query row, best first, ties by row id; see
        :meth:`IndexView.search`."""
        with self.pinned() as view:
            return view.search(queries, k, exclude, part)
