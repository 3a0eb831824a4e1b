"""The global batch order: random batches, then batches of whole clusters of similar queries (hard negatives).

Every rank builds the same list of global batches from (seed, epoch, cluster assignment), so N workers see exactly
the batches one worker would; the step (:func:`vixml_ray.train.step.make_step_batch`) then gives each rank a
contiguous share (:func:`slice_bounds`) of the batch's queries and labels together. Epochs are counted from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vixml_ray.config import ClusterConfig
from vixml_ray.train.clustering import cluster_sizes

_SALT = 0xB47C  # the batch-order stream of (seed, epoch)


@dataclass(frozen=True)
class ClusterSchedule:
    """When clusters are (re)computed and how big they are (NGAME's schedule, epochs from 0)."""

    cfg: ClusterConfig

    def cluster_size(self, epoch: int) -> int | None:
        """Queries per cluster at ``epoch`` (``initial_size`` doubled at each ``double_at`` epoch reached), or None
        before ``start_epoch`` (random batches)."""
        if epoch < self.cfg.start_epoch:
            return None
        return self.cfg.initial_size * 2 ** sum(1 for e in self.cfg.double_at if e <= epoch)

    def refresh(self, epoch: int) -> bool:
        """Whether clusters are computed anew from fresh embeddings at the start of ``epoch``."""
        return epoch >= self.cfg.start_epoch and (epoch - self.cfg.start_epoch) % self.cfg.refresh_every == 0


class GlobalBatchSampler:
    """Global batches of at most ``batch_size`` of the training query ``rows`` (dataset row ids).

    Without clusters: a seeded permutation cut into batches. With clusters (:meth:`set_clusters`): clusters in a
    seeded random order, each cluster's rows shuffled, packed greedily into batches of whole clusters (a cluster
    bigger than a batch fills batches of its own). A trailing batch smaller than half a batch is dropped (its
    queries are reshuffled next epoch) unless it is the only one.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        self.rows = np.asarray(rows, dtype=np.int64)
        if len(self.rows) == 0:
            raise ValueError("no training queries to sample from")
        self.batch_size = batch_size
        self.seed = seed
        self.cluster_ids: np.ndarray | None = None  # cluster of each entry of self.rows
        self.cluster_size: int | None = None

    def set_clusters(self, cluster_ids: np.ndarray | None, cluster_size: int | None = None) -> None:
        """Cluster id of each entry of ``rows`` (None: back to random batches)."""
        if cluster_ids is not None:
            cluster_ids = np.asarray(cluster_ids, dtype=np.int64)
            if cluster_ids.shape != self.rows.shape:
                raise ValueError(f"need one cluster id per training row ({len(self.rows)}), got {cluster_ids.shape}")
        self.cluster_ids = cluster_ids
        self.cluster_size = cluster_size if cluster_ids is not None else None

    def merge_siblings(self, cluster_size: int) -> None:
        """Doubles the clusters without new embeddings: leaves ``2j`` and ``2j+1`` of the balanced 2-means tree
        (:func:`vixml_ray.train.clustering.balanced_clusters`) are exactly the two halves of node ``j``."""
        if self.cluster_ids is None:
            raise ValueError("no clusters to merge")
        self.cluster_ids = self.cluster_ids >> 1
        self.cluster_size = cluster_size

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches of ``epoch`` (lists of dataset rows), the same on every rank."""
        rng = np.random.default_rng([self.seed, epoch, _SALT])
        if self.cluster_ids is None:
            order = self.rows[rng.permutation(len(self.rows))]
            bounds = list(range(0, len(order), self.batch_size)) + [len(order)]
        else:
            order, bounds = self._cluster_order(rng)
        batches = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if len(batches) > 1 and len(batches[-1]) < self.batch_size // 2:
            batches.pop()
        return batches

    def num_batches(self, epoch: int, cluster_size: int | None) -> int:
        """The number of batches of ``epoch`` with clusters of ``cluster_size`` (None: random), without clusters:
        cluster sizes depend only on the number of rows, and the packing only on the sizes and (seed, epoch)."""
        planner = GlobalBatchSampler(self.rows, self.batch_size, self.seed)
        if cluster_size is not None:
            sizes = cluster_sizes(len(self.rows), cluster_size)
            planner.set_clusters(np.repeat(np.arange(len(sizes)), sizes), cluster_size)
        return len(planner.epoch_batches(epoch))

    def _cluster_order(self, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
        ids = self.cluster_ids
        assert ids is not None
        num = int(ids.max()) + 1
        rank = rng.permutation(num)[ids]  # shuffled cluster order
        order = np.lexsort((rng.random(len(ids)), rank))  # by cluster rank, shuffled inside each cluster
        sizes = np.bincount(rank, minlength=num)
        bounds, filled = [0], 0
        for size in sizes:
            while size > self.batch_size:  # a cluster bigger than a batch fills whole batches alone
                if filled:
                    bounds.append(bounds[-1] + filled)
                    filled = 0
                bounds.append(bounds[-1] + self.batch_size)
                size -= self.batch_size
            if filled + size > self.batch_size:
                bounds.append(bounds[-1] + filled)
                filled = 0
            filled += size
        if filled:
            bounds.append(bounds[-1] + filled)
        return self.rows[order], bounds

    def state_dict(self) -> dict[str, Any]:
        return {"cluster_ids": None if self.cluster_ids is None else self.cluster_ids.astype(np.int32),
                "cluster_size": self.cluster_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = state["cluster_ids"]
        self.set_clusters(None if ids is None else np.asarray(ids, dtype=np.int64), state["cluster_size"])


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of a global batch; the shares of all ranks partition it in order."""
    bounds = slice_bounds(len(batch), world_size)
    return batch[bounds[rank] : bounds[rank + 1]]


def slice_bounds(n: int, world_size: int) -> np.ndarray:
    """``world_size + 1`` boundaries splitting ``n`` rows into near-equal contiguous shares (larger ones first)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    sizes = np.full(world_size, n // world_size, dtype=np.int64)
    sizes[: n % world_size] += 1
    return np.concatenate([[0], np.cumsum(sizes)])
