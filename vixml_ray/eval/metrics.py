"""Extreme-classification metrics, defined exactly as pyxclib (``xclib/evaluation/xc_metrics.py``) defines them.

Predictions are ranked label ids per row (best first, ``-1`` = no prediction); the ground truth is a binary
``scipy.sparse.csr_matrix`` (non-zero = relevant; stored values are ignored). Every metric is returned at 1..k as a
fraction, averaged over ALL rows (rows without labels count, as in pyxclib):

* ``P@j = mean_i hits_i(j) / j``
* ``nDCG@j = mean_i DCG_i(j) / IDCG_i(min(j, |Y_i|))`` with ``DCG_i(j) = sum_{r<=j} hit_ir / log2(r + 1)``
* ``R@j = mean_i hits_i(j) / max(|Y_i|, 1)``
* ``PSP@j`` = the same mean with hits weighted by the label's inverse propensity, divided by the mean of the best
  achievable weighted list (each row's true labels sorted by inverse propensity): a ratio of means, as pyxclib's
  ``psprecision``.
* ``PSnDCG@j``: the weighted DCG over the unweighted ideal, divided by the same quantity for the best list (pyxclib's
  ``psndcg``).

Propensities follow Jain et al. 2016 from TRAINING label counts (:func:`inverse_propensity`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _binary_csr(matrix: sp.spmatrix, name: str) -> sp.csr_matrix:
    """A canonical copy (sorted indices, no duplicates, no explicit zeros) with every stored value set to 1."""
    if not sp.issparse(matrix):
        raise TypeError(f"{name} must be a scipy.sparse matrix, got {type(matrix).__name__}")
    out = sp.csr_matrix(matrix, copy=True)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.data = np.ones_like(out.data, dtype=np.float64)
    return out


def inverse_propensity(train_labels: sp.csr_matrix, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """Inverse propensity of every label: ``1 + C (n_l + b)^-a`` with ``C = (ln N - 1)(b + 1)^a``, where ``n_l`` is
    the number of training points carrying label ``l`` and ``N`` the number of training points."""
    labels = _binary_csr(train_labels, "train_labels")
    num_points, num_labels = labels.shape
    return inverse_propensity_of_counts(np.bincount(labels.indices, minlength=num_labels), num_points, a, b)


def inverse_propensity_of_counts(counts: np.ndarray, num_points: int, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """:func:`inverse_propensity` from the training label ``counts`` and the number of training points."""
    if num_points == 0:
        raise ValueError("no training points: propensities need training label counts")
    c = (np.log(num_points) - 1.0) * (b + 1.0) ** a
    return 1.0 + c * (np.asarray(counts, dtype=np.float64) + b) ** -a


def _hits(topk: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """``hits[i, j] = 1`` where ``topk[i, j]`` is a true label of row i (``truth`` canonical and binary)."""
    n, num_labels = truth.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(truth.indptr))
    truth_keys = rows * num_labels + truth.indices  # sorted: rows ascend, indices ascend within a row
    pred = topk.astype(np.int64, copy=False)
    keys = np.arange(n, dtype=np.int64)[:, None] * num_labels + np.maximum(pred, 0)
    if len(truth_keys) == 0:
        return np.zeros(pred.shape, dtype=np.float64)
    found = truth_keys[np.minimum(np.searchsorted(truth_keys, keys), len(truth_keys) - 1)] == keys
    return (found & (pred >= 0)).astype(np.float64)


def _best_weights(truth: sp.csr_matrix, inv_propensity: np.ndarray, k: int) -> np.ndarray:
    """Per row, the inverse propensities of its true labels sorted descending, the first k (zero-padded)."""
    n = truth.shape[0]
    counts = np.diff(truth.indptr)
    rows = np.repeat(np.arange(n), counts)
    weights = inv_propensity[truth.indices]
    order = np.lexsort((-weights, rows))  # grouped by row (rows[order] == rows), weights descending in a row
    rank = np.arange(len(order)) - truth.indptr[rows]
    keep = rank < k
    best = np.zeros((n, k), dtype=np.float64)
    best[rows[keep], rank[keep]] = weights[order][keep]
    return best


def _precision(flags: np.ndarray) -> np.ndarray:
    k = flags.shape[1]
    return np.mean(np.cumsum(flags, axis=1) / np.arange(1, k + 1), axis=0)


def _ndcg(flags: np.ndarray, counts: np.ndarray) -> np.ndarray:
    k = flags.shape[1]
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    dcg = np.cumsum(flags * discount, axis=1)
    ideal_terms = np.minimum(np.arange(k)[None, :], np.maximum(counts, 1)[:, None] - 1)
    ideal = np.cumsum(discount)[ideal_terms]  # IDCG over min(j, |Y_i|) terms; rows without labels have dcg 0
    return np.mean(dcg / ideal, axis=0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where no row has a label (pyxclib would return nan)."""
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def xmc_metrics(
    topk: np.ndarray,
    truth: sp.csr_matrix,
    k: int = 5,
    inv_propensity: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """P, nDCG, R (and PSP, PSnDCG with propensities) at 1..k, each an array of length k.

    ``topk``: (n, >=k) label ids ranked best first, -1 = no prediction. ``truth``: (n, num_labels) sparse.
    """
    topk = np.asarray(topk)
    if topk.ndim != 2 or not np.issubdtype(topk.dtype, np.integer):
        raise ValueError(f"topk must be a 2-D integer array of label ids, got shape {topk.shape} dtype {topk.dtype}")
    if k < 1 or topk.shape[1] < k:
        raise ValueError(f"topk has {topk.shape[1]} columns; k={k} needs at least k >= 1 of them")
    truth = _binary_csr(truth, "truth")
    n, num_labels = truth.shape
    if topk.shape[0] != n:
        raise ValueError(f"topk has {topk.shape[0]} rows but truth has {n}")
    topk = topk[:, :k]
    if topk.size and (topk.max() >= num_labels or topk.min() < -1):
        raise ValueError(f"topk holds label ids outside [-1, {num_labels}) (truth has {num_labels} labels)")
    counts = np.diff(truth.indptr)
    flags = _hits(topk, truth)
    out = {
        "P": _precision(flags),
        "nDCG": _ndcg(flags, counts),
        "R": np.mean(np.cumsum(flags, axis=1) / np.maximum(counts, 1)[:, None], axis=0),
    }
    if inv_propensity is not None:
        inv_propensity = np.asarray(inv_propensity, dtype=np.float64).ravel()
        if inv_propensity.shape[0] != num_labels:
            raise ValueError(f"inv_propensity has {inv_propensity.shape[0]} entries, truth has {num_labels} labels")
        weighted = flags * inv_propensity[np.maximum(topk, 0)]
        best = _best_weights(truth, inv_propensity, k)
        out["PSP"] = _ratio(_precision(weighted), _precision(best))
        out["PSnDCG"] = _ratio(_ndcg(weighted, counts), _ndcg(best, counts))
    return out
