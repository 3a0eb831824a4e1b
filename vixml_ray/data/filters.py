"""Test-time label filters: (test row, label) pairs removed from predictions (never from the ground truth), and
:func:`filter_predictions`, which removes them from ranked predictions (evaluation, validation, the index).

Modes (``DataConfig.filters``):

* ``file``: the source's ``filter_labels_test.txt`` (as published with the Extreme Classification Repository);
* ``self_reciprocal``: generated for datasets whose labels are items themselves (related-item/product-to-product
  tasks, uids shared between items and labels), following the repository's note on trivial pairs:

  - self: test item ``t`` whose uid equals the uid of label ``j`` gives ``(t, j)`` (an item must not retrieve itself);
  - reciprocal: a TRAINING item ``a`` that is itself label ``k`` (same uid) and has label ``j`` in its targets, where
    label ``j`` is test item ``t`` (same uid), gives ``(t, k)``: the test item's link back to ``a`` is the reverse of
    a training pair and is filtered;

* ``auto``: ``file`` when the source has the file, else ``none``; ``none``: no pairs.

Generation streams: it keeps one int64 per label (the test row sharing its uid) and the uid column of the labels,
never the items. Uids are assumed unique within each file (as in the repository); on a duplicate test uid the last
test row wins.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vixml_ray import storage
from vixml_ray.data.xc_format import FILTER_FILE
from vixml_ray.errors import MissingPathError

FILTER_MODES = ("auto", "none", "file", "self_reciprocal")


def resolve_mode(mode: str, filter_file: Optional[str], source: str) -> str:
    """The effective mode; ``file`` without a file is an error naming the expected file."""
    if mode == "auto":
        return "file" if filter_file else "none"
    if mode == "file" and not filter_file:
        raise MissingPathError(storage.join(source, FILTER_FILE),
                               f"data.filters=file but {source} has no {FILTER_FILE}")
    if mode not in FILTER_MODES:
        raise ValueError(f"unknown filter mode {mode!r} (modes: {', '.join(FILTER_MODES)})")
    return mode


def normalise_pairs(pairs: np.ndarray) -> np.ndarray:
    """Unique pairs sorted by (row, label), int64 [n, 2]."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


class SelfReciprocalFilter:
    """Builds self and reciprocal pairs while the test and then the train items stream past."""

    def __init__(self, label_uids: pa.Array):
        self._label_uids = label_uids
        self._test_row_of_label = np.full(len(label_uids), -1, dtype=np.int64)
        self._pairs: list[np.ndarray] = []

    def _label_of(self, uids: pa.Array) -> np.ndarray:
        return pc.index_in(uids, value_set=self._label_uids).fill_null(-1).to_numpy().astype(np.int64)

    def add_test(self, batch: pa.RecordBatch) -> None:
        """Self pairs of one test batch; remembers which label is which test row."""
        label = self._label_of(batch.column("uid"))
        hit = label >= 0
        rows = batch.column("row").to_numpy()[hit]
        self._test_row_of_label[label[hit]] = rows
        self._pairs.append(np.stack([rows, label[hit]], axis=1))

    def add_train(self, batch: pa.RecordBatch) -> None:
        """Reciprocal pairs of one training batch (call after every test batch was added)."""
        k = self._label_of(batch.column("uid"))
        hit = np.flatnonzero(k >= 0)
        if not hit.size:
            return
        targets = batch.column("labels").take(pa.array(hit))
        lengths = pc.list_value_length(targets).to_numpy(zero_copy_only=False)
        j = pc.list_flatten(targets).to_numpy().astype(np.int64)
        t = self._test_row_of_label[j]
        k_rep = np.repeat(k[hit], lengths)
        keep = t >= 0
        self._pairs.append(np.stack([t[keep], k_rep[keep]], axis=1))

    def pairs(self) -> np.ndarray:
        return normalise_pairs(np.concatenate(self._pairs) if self._pairs else np.empty((0, 2), np.int64))


def filter_predictions(
    topk: np.ndarray, scores: np.ndarray, filter_pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Removes the (row, label) pairs of ``filter_pairs`` (shape (m, 2)) from the predictions only.

    The remaining predictions of a row keep their order and move up; the freed tail is filled with -1 / -inf.
    Returns new arrays of the input's shape.
    """
    topk = np.asarray(topk)
    scores = np.asarray(scores)
    if topk.shape != scores.shape or topk.ndim != 2:
        raise ValueError(f"topk {topk.shape} and scores {scores.shape} must be 2-D arrays of one shape")
    pairs = np.asarray(filter_pairs, dtype=np.int64).reshape(-1, 2)
    n = topk.shape[0]
    if len(pairs) and (pairs[:, 0].min() < 0 or pairs[:, 0].max() >= n or pairs[:, 1].min() < 0):
        raise ValueError(f"filter_pairs must hold rows in [0, {n}) and non-negative labels")
    width = int(max(topk.max(initial=-1), pairs[:, 1].max(initial=-1))) + 2  # labels shifted by 1: -1 -> 0
    filter_keys = np.sort(pairs[:, 0] * width + pairs[:, 1] + 1)
    keys = np.arange(n, dtype=np.int64)[:, None] * width + topk.astype(np.int64) + 1
    if len(filter_keys) == 0:
        return topk.copy(), scores.copy()
    removed = filter_keys[np.minimum(np.searchsorted(filter_keys, keys), len(filter_keys) - 1)] == keys
    order = np.argsort(removed, axis=1, kind="stable")  # kept slots first, in their original order
    new_ids = np.take_along_axis(np.where(removed, -1, topk), order, axis=1)
    new_scores = np.take_along_axis(np.where(removed, -np.inf, scores).astype(scores.dtype), order, axis=1)
    return new_ids.astype(topk.dtype, copy=False), new_scores


def rows_pairs(pairs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The (position in ``rows``, label) pairs of ``rows`` among ``pairs`` ((row, label), sorted by row)."""
    lo = np.searchsorted(pairs[:, 0], rows, side="left")
    counts = np.searchsorted(pairs[:, 0], rows, side="right") - lo
    total = int(counts.sum())
    starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
    picked = pairs[starts + np.arange(total), 1] if total else np.empty(0, dtype=np.int64)
    return np.stack([np.repeat(np.arange(len(rows)), counts), picked], axis=1)
