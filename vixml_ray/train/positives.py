"""Positive sampling and the targets of one global batch.

Each epoch every training query samples ONE positive label from its label set, uniformly or weighted by the
labels' inverse propensity (tail labels sampled more often). The draw is a pure function of (seed, epoch), so every
rank draws the same positives without talking to the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

_SALT = 0x5A3F  # separates this stream from the batch-order stream of the same (seed, epoch)


class PositiveSampler:
    """Draws one positive label per query row of ``labels`` (CSR [queries x labels])."""

    def __init__(self, labels: sp.csr_matrix, seed: int, inv_propensity: np.ndarray | None = None):
        labels = sp.csr_matrix(labels, copy=True)
        labels.sum_duplicates()
        labels.eliminate_zeros()
        self.labels = labels
        self.seed = seed
        self.degree = np.diff(labels.indptr)
        self._cum_weight: np.ndarray | None = None
        if inv_propensity is not None:
            inv_propensity = np.asarray(inv_propensity, dtype=np.float64)
            if inv_propensity.shape != (labels.shape[1],) or not (inv_propensity > 0).all():
                raise ValueError(f"inv_propensity must be positive with one entry per label ({labels.shape[1]})")
            self._cum_weight = np.cumsum(inv_propensity[labels.indices])

    def rows_with_labels(self) -> np.ndarray:
        """Query rows that have at least one label (the only ones that can be trained on)."""
        return np.flatnonzero(self.degree > 0)

    def sample(self, epoch: int) -> np.ndarray:
        """int64 [num_queries]: the sampled positive label of every row (-1 for rows without labels)."""
        rng = np.random.default_rng([self.seed, epoch, _SALT])
        u = rng.random(len(self.degree))
        starts, ends = self.labels.indptr[:-1], self.labels.indptr[1:]
        if self._cum_weight is None:
            picks = starts + np.minimum((u * self.degree).astype(np.int64), self.degree - 1)
        else:  # inverse-CDF within each row of the flattened cumulative weights
            before = np.where(starts > 0, self._cum_weight[np.maximum(starts - 1, 0)], 0.0)
            row_total = np.where(ends > 0, self._cum_weight[np.maximum(ends - 1, 0)], 0.0) - before
            picks = np.searchsorted(self._cum_weight, before + u * row_total, side="right")
            picks = np.clip(picks, starts, np.maximum(ends - 1, starts))
        out = np.full(len(self.degree), -1, dtype=np.int64)
        has = self.degree > 0
        out[has] = self.labels.indices[picks[has]]
        return out


@dataclass
class BatchTargets:
    """The labels of a global batch and which (query, label) pairs are true."""

    label_ids: np.ndarray  # int64 [M]: the union of the sampled positives, sorted
    pos_index: np.ndarray  # int64 [B]: each query's sampled positive as an index into label_ids
    positive_mask: np.ndarray  # bool [B, M]: every true pair (from the full label sets)


def batch_targets(labels: sp.csr_matrix, rows: np.ndarray, sampled: np.ndarray) -> BatchTargets:
    """Targets of the global batch ``rows`` given each query's sampled positive ``sampled[rows]``."""
    positives = sampled[rows]
    if (positives < 0).any():
        raise ValueError("a batch holds a query without labels; train only on rows_with_labels()")
    label_ids, pos_index = np.unique(positives, return_inverse=True)
    sub = labels[rows]  # CSR [B x num_labels]
    owner = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
    slot = np.searchsorted(label_ids, sub.indices)
    hit = label_ids[np.minimum(slot, len(label_ids) - 1)] == sub.indices
    mask = np.zeros((len(rows), len(label_ids)), dtype=bool)
    mask[owner[hit], slot[hit]] = True
    return BatchTargets(label_ids.astype(np.int64), pos_index.astype(np.int64), mask)
