"""Embedding many rows across ranks without gradients, and the metrics the training loop reports (``val_*`` after
epochs, ``test_*`` at the end).

Every rank embeds an equal share of the rows (padded with repeats, so under ZeRO-3 every rank runs the same number
of forward calls) and the shares are all-gathered; every rank then holds the same embeddings and metrics.

These are NOT the numbers of :func:`vixml_ray.eval.evaluate.evaluate` (the evaluation job), although both score the
test split with the same metrics, filter pairs and propensities (from every TRAIN row): here the top-k comes from a
brute-force torch ``topk`` over all labels embedded in the training process (exact; ties in torch's order), never
retrieval-augmented; ``evaluate`` embeds with the published export in Ray Data and searches the sharded index
(``index.*``: exact or approximate, ties in the index's order), retrieval-augmented with ``infer.raa.enabled``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from vixml_ray.data.filters import filter_predictions
from vixml_ray.eval.metrics import xmc_metrics
from vixml_ray.model.embedder import Embedder
from vixml_ray.model.inference import embed_arrays
from vixml_ray.model.tokens import TokenArrays
from vixml_ray.train import dist
from vixml_ray.vision.bank import FeatureBank


def embed_rows(embedder: Embedder, tokens: TokenArrays, images: FeatureBank | None, split: str, rows: np.ndarray,
               batch_size: int, device: torch.device, as_labels: bool = False) -> np.ndarray:
    """float32 [len(rows), hidden] embeddings of ``rows`` of ``split``, computed on all ranks together; with
    ``as_labels`` (``split`` = "label") the vectors labels are scored with (their prototypes, when the model has
    them)."""
    rows = np.asarray(rows, dtype=np.int64)
    world = dist.world_size()
    share = math.ceil(len(rows) / world) if len(rows) else 0
    padded = np.resize(rows, share * world) if len(rows) else rows
    mine = padded[dist.rank() * share : (dist.rank() + 1) * share]
    lookup = None if images is None else (lambda batch_rows: images.get(split, batch_rows))
    label_ids = np.arange(len(tokens)) if as_labels else None
    local = embed_arrays(embedder, tokens, lookup, mine, batch_size, device, label_ids=label_ids)
    gathered = dist.all_gather_array(local, [share] * world, device=device)
    return gathered[: len(rows)]


def exact_top_k(queries: np.ndarray, labels: np.ndarray, k: int, device: torch.device,
                max_scores: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` labels by inner product, brute force in torch: (ids int64 [n, k], scores float32 [n, k]),
    best first."""
    k = min(k, len(labels))
    label_t = torch.as_tensor(labels, device=device)
    step = max(1, max_scores // max(1, len(labels)))
    ids = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    for lo in range(0, len(queries), step):
        s = torch.as_tensor(queries[lo : lo + step], device=device) @ label_t.T
        top = s.topk(k, dim=1)
        ids[lo : lo + step] = top.indices.cpu().numpy()
        scores[lo : lo + step] = top.values.cpu().numpy()
    return ids, scores


def validation_metrics(query_emb: np.ndarray, label_emb: np.ndarray, truth: sp.csr_matrix, k: int, topk: int,
                       device: torch.device, inv_propensity: np.ndarray | None = None,
                       filter_pairs: np.ndarray | None = None, prefix: str = "") -> dict[str, float]:
    """The training loop's ``{prefix}P@j``, ``nDCG@j``, ``R@j`` (and ``PSP@j``) for j in 1..k, in percent, from the
    :func:`exact_top_k` ``topk`` labels with the ``filter_pairs`` (query row, label) removed from the predictions
    (how they differ from the evaluation job's: see the module docstring)."""
    ids, scores = exact_top_k(query_emb, label_emb, max(k, topk), device)
    if filter_pairs is not None and len(filter_pairs):
        ids, scores = filter_predictions(ids, scores, filter_pairs)
    if ids.shape[1] < k:  # fewer labels than k: pad with "no prediction"
        ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
    metrics = xmc_metrics(ids, truth, k=k, inv_propensity=inv_propensity)
    return {f"{prefix}{name}@{j + 1}": round(100.0 * float(values[j]), 4)
            for name, values in metrics.items() for j in range(k)}
