"""Embedding many items at once (labels for the index, queries for clustering and evaluation), without gradients."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from vixml_ray.model.embedder import Embedder
from vixml_ray.model.tokens import TokenArrays


def embed_arrays(embedder: Embedder, tokens: TokenArrays, image_feats: np.ndarray | None = None,
                 image_mask: np.ndarray | None = None, rows: np.ndarray | None = None, batch_size: int = 256,
                 device: torch.device | str | None = None, progress: bool = False,
                 label_ids: np.ndarray | None = None) -> np.ndarray:
    """float32 [n, hidden] embeddings of ``rows`` (default: all) of ``tokens``, in the order of ``rows``.

    Labels: ``label_ids`` (aligned with ``tokens``) are the label rows the items are; the result is then the vectors
    labels are scored with (:meth:`Embedder.label_vectors`: PRIME prototypes when the model has them).

    ``image_feats`` [N, S, D] and ``image_mask`` bool [N, S] are indexed by the same rows (memory maps are fine).
    Batches group items of similar length (sorted by length) so dynamic padding trims most of the width.
    """
    rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    device = torch.device(device) if device is not None else next(embedder.parameters()).device
    order = np.argsort(np.asarray(tokens.lengths[rows]), kind="stable")
    out = np.empty((len(rows), embedder.hidden_size), dtype=np.float32)
    was_training = embedder.training
    embedder.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(rows), batch_size), desc="embed", disable=not progress):
                positions = order[start:start + batch_size]
                batch_rows = rows[positions]
                batch = tokens.take(batch_rows)
                feats = mask = None
                if image_feats is not None:
                    feats = torch.as_tensor(np.asarray(image_feats[batch_rows], dtype=np.float32), device=device)
                    if image_mask is not None:
                        mask = torch.as_tensor(np.asarray(image_mask[batch_rows], dtype=bool), device=device)
                emb = embedder(torch.as_tensor(batch.ids, dtype=torch.long, device=device),
                               torch.as_tensor(batch.lengths, dtype=torch.long, device=device), feats, mask)
                if label_ids is not None:
                    emb = embedder.label_vectors(emb, torch.as_tensor(label_ids[batch_rows], device=device))
                out[positions] = emb.float().cpu().numpy()
    finally:
        embedder.train(was_training)
    return out
