"""One index shard as a Ray Serve deployment: each replica holds the rows of shard ``i`` of every served part
(labels, and training queries for RAA) of the versions it is asked for, so the index memory lives once per shard
replica, never in the ingress.

Every call names the version it wants (the ingress pins one per request). A replica loads a version when the
ingress prepares it before switching (:meth:`ShardReplica.prepare`), or on the first call for it (a replica that
Serve restarted or added); it keeps the version the ingress switched to last and releases an older one once it has
had no call for :data:`RELEASE_IDLE_S` seconds (its in-flight calls finished).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vixml_ray.config import IndexConfig
from vixml_ray.index.shard import IndexShard
from vixml_ray.index.sharded import shard_bounds
from vixml_ray.index.versions import LABELS, read_manifest

log = logging.getLogger(__name__)

RELEASE_IDLE_S = 10.0  # an old version unused this long after the switch is released (covers a request's calls)


@dataclass
class _Held:
    shard: IndexShard
    loaded_at: float
    last_used: float
    inflight: int = 0


class ShardReplica:
    """Shard ``shard`` of ``num_shards`` of ``index_dir``; starts with ``version`` loaded."""

    def __init__(self, index_dir: str, shard: int, num_shards: int, parts: Sequence[str], cfg: IndexConfig,
                 version: str):
        self.index_dir, self.shard, self.num_shards, self.parts, self.cfg = index_dir, shard, num_shards, parts, cfg
        self._held: dict[str, _Held] = {}
        self._first_asked: dict[str, float] = {}  # first call per version (kept across a release and reload)
        self._lock = threading.Lock()  # guards _held
        self._loading: dict[str, threading.Lock] = {}  # one loader per version
        self._get(version)

    def _get(self, version: str) -> _Held:
        with self._lock:
            held = self._held.get(version)
            if held is not None:
                return held
            loading = self._loading.setdefault(version, threading.Lock())
        with loading:  # concurrent calls for a new version wait for one load
            with self._lock:
                if version in self._held:
                    return self._held[version]
            manifest = read_manifest(self.index_dir, version)
            ranges = {p: shard_bounds(manifest.num_rows(p), self.num_shards)[self.shard] for p in self.parts}
            start = time.perf_counter()
            shard = IndexShard(self.index_dir, version, ranges, self.cfg)
            log.info("shard %d: loaded version %s in %.1f s", self.shard, version, time.perf_counter() - start)
            now = time.monotonic()
            with self._lock:
                self._held[version] = _Held(shard, now, now)
                return self._held[version]

    def _use(self, version: str) -> _Held:
        held = self._get(version)
        with self._lock:
            now = time.monotonic()
            held.inflight += 1
            held.last_used = now
            self._first_asked.setdefault(version, now)  # when the ingress switched to it
        return held

    def _done(self, held: _Held) -> None:
        with self._lock:
            held.inflight -= 1
            held.last_used = time.monotonic()
            live = max((v for v in self._held if v in self._first_asked), key=self._first_asked.__getitem__)
            now = time.monotonic()
            # older than the live version: asked before it, or loaded before the switch and never asked (a version
            # prepared after the switch and not asked yet is the next one: kept)
            old = [v for v, h in self._held.items() if v != live and h.inflight == 0
                   and now - h.last_used > RELEASE_IDLE_S
                   and (v in self._first_asked or h.loaded_at < self._first_asked[live])]
            for version in old:
                del self._held[version]
                log.info("shard %d: released version %s", self.shard, version)
        if old:
            gc.collect()

    def search(self, version: str, queries: np.ndarray, k: int, part: str = LABELS
               ) -> tuple[np.ndarray, np.ndarray, str]:
        """See :meth:`vixml_ray.index.shard.IndexShard.search`, from ``version``."""
        held = self._use(version)
        try:
            return held.shard.search(queries, k, part)
        finally:
            self._done(held)

    def pair_scores(self, version: str, queries: np.ndarray, rows: np.ndarray, ids: np.ndarray, part: str = LABELS
                    ) -> tuple[np.ndarray, str]:
        """See :meth:`vixml_ray.index.shard.IndexShard.pair_scores`, from ``version``."""
        held = self._use(version)
        try:
            return held.shard.pair_scores(queries, rows, ids, part)
        finally:
            self._done(held)

    def prepare(self, version: str) -> dict[str, Any]:
        """Loads ``version`` (if not yet held) and returns its statistics; called before the ingress switches."""
        return self._get(version).shard.info()

    def versions(self) -> list[str]:
        """The versions this replica holds."""
        with self._lock:
            return sorted(self._held)
