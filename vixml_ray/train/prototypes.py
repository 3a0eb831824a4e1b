"""Training-side state of the PRIME label prototypes: the label clusters (once, before training) and the per-label
centroids of the training queries' embeddings (every epoch)."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.sparse as sp
import torch

from vixml_ray.config import Config
from vixml_ray.model.embedder import Embedder
from vixml_ray.train import dist
from vixml_ray.train.clustering import balanced_clusters
from vixml_ray.train.inputs import TrainInputs
from vixml_ray.train.validation import embed_rows

log = logging.getLogger(__name__)


def label_centroids(query_emb: np.ndarray, labels: sp.csr_matrix, chunk_bytes: int = 1 << 28
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(centroid float32 [L, H], has_centroid bool [L]): each label's exact mean of the embeddings ``query_emb``
    [N, H] of its queries (rows of ``labels`` [N, L]); zeros and False for a label without queries.

    Summed in float64 over column blocks of at most ``chunk_bytes`` of float64 sums, each divided into the float32
    result at once: one [L, H] array is all the memory that grows with L x H (at 1.3M labels x 2048 dims a
    float64 [L, H] would be 21 GB, per worker)."""
    labels = sp.csr_matrix(labels).astype(bool).astype(np.float64)  # a copy: relevance values do not weigh
    counts = np.asarray(labels.sum(axis=0)).ravel()
    by_label = labels.T  # CSC, no copy
    num_labels, hidden = labels.shape[1], query_emb.shape[1]
    centroid = np.empty((num_labels, hidden), dtype=np.float32)
    step = max(1, min(hidden, chunk_bytes // max(1, 8 * num_labels)))
    divisor = np.maximum(counts, 1)[:, None]
    for lo in range(0, hidden, step):
        sums = by_label @ np.asarray(query_emb[:, lo:lo + step], dtype=np.float64)
        centroid[:, lo:lo + step] = sums / divisor
    return centroid, counts > 0


def cluster_labels(label_emb: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """Balanced 2-means ids of the labels into ``num_clusters`` (a power of two below the label count, see
    :func:`~vixml_ray.model.prototypes.num_prototype_clusters`) clusters; one per label when ``num_clusters`` is
    the label count."""
    num_labels = len(label_emb)
    if num_clusters >= num_labels:
        return np.arange(num_labels, dtype=np.int64)
    depth = num_clusters.bit_length() - 1
    if 1 << depth != num_clusters:
        raise ValueError(f"num_clusters must be a power of two below the label count, got {num_clusters}")
    return np.asarray(balanced_clusters(label_emb, math.ceil(num_labels / num_clusters), seed=seed, depth=depth),
                      dtype=np.int64)


def init_prototypes(embedder: Embedder, inputs: TrainInputs, cfg: Config, device: torch.device) -> None:
    """Clusters the labels by the initial model's label embeddings (all ranks embed, rank 0 clusters, the ids are
    broadcast) and, with ``model.prototypes.free_init: mean``, starts each free vector at its cluster's mean."""
    prototypes = embedder.prototypes
    assert prototypes is not None
    start = time.perf_counter()
    embedder.to(device)
    rows = np.arange(inputs.dataset.num_labels)
    emb = embed_rows(embedder, inputs.tokens["label"], inputs.images, "label", rows, cfg.eval.batch_size, device)
    ids = cluster_labels(emb, prototypes.num_clusters, cfg.train.seed) if dist.rank() == 0 else None
    prototypes.set_clusters(dist.broadcast_object(ids), emb if cfg.model.prototypes.free_init == "mean" else None)
    log.info("clustered %d labels into %d prototype clusters in %.1f s", len(rows), prototypes.num_clusters,
             time.perf_counter() - start)
