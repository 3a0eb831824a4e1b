"""Deterministic top-k: rank by score descending, ties by label id ascending; -1 ids (no label) rank last."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def top_k_sorted(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` columns of every row ordered by (-score, id), padded with -inf / -1 to width ``k``.

    Padding slots must carry id -1 and score -inf.
    """
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merges per-shard (scores, global ids) results, each already holding its shard's top-k in the same order,
    into the global top-k: exactly the top-k of one index over the union of the shards."""
    if not parts:
        raise ValueError("merge_topk needs at least one shard result")
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    return top_k_sorted(scores, ids, k)
