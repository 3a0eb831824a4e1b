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


def label_centroids(query_emb: np.ndarray, labels: sp.csr_matrix, block_labels: int = 1 << 16
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(centroid float32 [L, H], has_centroid bool [L]): each label's mean of the embeddings ``query_emb`` [N, H]
    of its queries (rows of ``labels`` [N, L]; float32 sums); zeros and False for a label without queries. Memory:
    the output and one block of ``block_labels`` labels' sums on top of the inputs (a million labels fit)."""
    by_label = sp.csc_matrix(labels).astype(bool).astype(np.float32)  # a copy: relevance values do not weigh
    counts = np.diff(by_label.indptr)
    emb = np.asarray(query_emb, dtype=np.float32)
    centroid = np.empty((by_label.shape[1], emb.shape[1]), dtype=np.float32)
    for lo in range(0, by_label.shape[1], block_labels):
        centroid[lo:lo + block_labels] = by_label[:, lo:lo + block_labels].T @ emb
    centroid /= np.maximum(counts, 1)[:, None]
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
