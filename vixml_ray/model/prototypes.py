"""PRIME label prototypes: a label's final vector from its text embedding, a free vector shared by its label cluster
and the centroid of its training queries' embeddings, combined by one transformer encoder layer and mean-pooled.

The free vectors and the combiner are parameters (their own learning rate); the label -> cluster map and the
centroids are buffers: the map is fixed once at the start of training (balanced k-means over the label embeddings),
the centroids are recomputed exactly every epoch by the training loop. A label without training queries has no
centroid and uses its text embedding in that slot. All of them are saved with the export.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vixml_ray.config import PrototypeConfig
from vixml_ray.errors import ConfigError

NUM_PARTS = 3  # text embedding, cluster free vector, centroid


def num_prototype_clusters(requested: int, num_labels: int) -> int:
    """One cluster per label when ``requested >= num_labels``, else ``requested`` rounded down to a power of two
    (the label clusters are the leaves of a balanced 2-means tree)."""
    if requested >= num_labels:
        return num_labels
    return 1 << (max(1, requested).bit_length() - 1)


class LabelPrototypes(nn.Module):
    """``forward(text_emb [M, H], label_rows [M]) -> prototypes [M, H]`` (unit norm)."""

    def __init__(self, cfg: PrototypeConfig, num_labels: int, hidden: int):
        super().__init__()
        if num_labels < 1:
            raise ConfigError(f"'model.prototypes.enabled' needs the number of labels, got {num_labels}")
        if hidden % cfg.heads:
            raise ConfigError(f"'model.prototypes.heads'={cfg.heads} must divide the embedding size {hidden}")
        self.num_labels = num_labels
        self.num_clusters = num_prototype_clusters(cfg.num_clusters, num_labels)
        self.free = nn.Parameter(torch.randn(self.num_clusters, hidden) * 0.02)
        self.combiner = nn.TransformerEncoderLayer(hidden, cfg.heads, dim_feedforward=cfg.ff_dim,
                                                   dropout=cfg.dropout, activation="gelu", batch_first=True)
        self.register_buffer("label_cluster", torch.arange(num_labels) % self.num_clusters)
        self.register_buffer("centroid", torch.zeros(num_labels, hidden))
        self.register_buffer("has_centroid", torch.zeros(num_labels, dtype=torch.bool))

    def forward(self, text_emb: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
        label_rows = label_rows.to(self.label_cluster.device)
        text = text_emb.to(self.free.dtype)
        free = self.free[self.label_cluster[label_rows]]
        centroid = torch.where(self.has_centroid[label_rows, None], self.centroid[label_rows].to(text.dtype), text)
        parts = torch.stack([text, free, centroid], dim=1)  # [M, 3, H]
        return F.normalize(self.combiner(parts).mean(dim=1).float(), dim=-1)

    # ---------------------------------------------------------------------------------------- set by training
    @torch.no_grad()
    def set_clusters(self, label_cluster: np.ndarray, label_emb: np.ndarray | None = None) -> None:
        """Fixes the label -> cluster map; with ``label_emb`` (float [L, H]) each free vector starts at its cluster's
        mean label embedding."""
        ids = torch.as_tensor(np.asarray(label_cluster), dtype=torch.long)
        if ids.shape != (self.num_labels,) or int(ids.min()) < 0 or int(ids.max()) >= self.num_clusters:
            raise ValueError(f"label_cluster must be {self.num_labels} ids in [0, {self.num_clusters})")
        self.label_cluster.copy_(ids)
        if label_emb is not None:
            emb = torch.as_tensor(np.asarray(label_emb), dtype=torch.float32)
            sums = torch.zeros(self.num_clusters, emb.shape[1]).index_add_(0, ids, emb)
            counts = torch.bincount(ids, minlength=self.num_clusters).clamp(min=1)[:, None]
            self.free.copy_((sums / counts).to(self.free))

    @torch.no_grad()
    def set_centroids(self, centroid: np.ndarray, has_centroid: np.ndarray) -> None:
        """Replaces every label's centroid (float [L, H]) and whether it has one (bool [L])."""
        self.centroid.copy_(torch.as_tensor(np.asarray(centroid), dtype=self.centroid.dtype))
        self.has_centroid.copy_(torch.as_tensor(np.asarray(has_centroid), dtype=torch.bool))
