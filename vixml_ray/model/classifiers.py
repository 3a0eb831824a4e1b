"""Per-label classifier vectors (NGAME/DEXA-style): one vector ``w_l`` per label, learnt on top of the encoder.

A label ``l`` with training queries is served by ``normalize(fusion * normalize(w_l) + (1 - fusion) * e_l)``, where
``e_l`` is its Siamese label vector (text embedding, or PRIME prototype); a label without training queries
(``trained[l]`` false) keeps ``e_l``. The served vectors are what the label index holds, so retrieval stays one
inner-product search. The vectors are buffers (set by :mod:`vixml_ray.train.classifiers`, saved with the export).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vixml_ray.config import ClassifierConfig
from vixml_ray.devices import DTYPES


class LabelClassifiers(nn.Module):
    """``forward(label_emb [M, H], label_rows [M]) -> served vectors [M, H]`` (unit norm)."""

    def __init__(self, cfg: ClassifierConfig, num_labels: int, hidden: int):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"'model.classifiers' needs the number of labels, got {num_labels}")
        self.num_labels = num_labels
        self.fusion = float(cfg.fusion)
        self.register_buffer("weight", torch.zeros(num_labels, hidden, dtype=DTYPES[cfg.dtype]))
        self.register_buffer("trained", torch.zeros(num_labels, dtype=torch.bool))

    def forward(self, label_emb: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
        label_rows = label_rows.to(self.weight.device)
        siamese = label_emb.float()
        vectors = F.normalize(self.weight[label_rows].float(), dim=-1)
        if self.fusion < 1.0:
            vectors = F.normalize(self.fusion * vectors + (1.0 - self.fusion) * siamese, dim=-1)
        return torch.where(self.trained[label_rows, None], vectors, siamese)

    @torch.no_grad()
    def set_vectors(self, weight: np.ndarray | torch.Tensor, trained: np.ndarray | torch.Tensor) -> None:
        """Replaces every label's vector (float [L, H]; rows of untrained labels are not used) and whether it has
        one (bool [L])."""
        weight = torch.as_tensor(weight)
        if weight.shape != self.weight.shape:
            raise ValueError(f"classifier vectors must be {tuple(self.weight.shape)}, got {tuple(weight.shape)}")
        self.weight.copy_(weight.to(self.weight.dtype))
        self.trained.copy_(torch.as_tensor(np.asarray(trained), dtype=torch.bool))
