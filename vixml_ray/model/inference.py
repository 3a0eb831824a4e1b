"""Embedding many items at once (labels for the index, queries for clustering, validation and evaluation), without
gradients; on every rank of a training run too (``torch.no_grad``, not inference mode: ZeRO-3 gathers parameters
inside these forwards)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from vixml_ray.model.embedder import Embedder
from vixml_ray.model.tokens import TokenArrays

# token rows -> (image features [B, S, D], mask bool [B, S]) of those rows (numpy arrays or tensors)
ImageLookup = Callable[[np.ndarray], tuple[Any, Any]]


def array_images(image_feats: np.ndarray | None, image_mask: np.ndarray | None = None) -> ImageLookup | None:
    """An :data:`ImageLookup` over arrays indexed by token row (memory maps are fine); None without features."""
    if image_feats is None:
        return None
    return lambda rows: (image_feats[rows], None if image_mask is None else image_mask[rows])


def embed_arrays(embedder: Embedder, tokens: TokenArrays, images: ImageLookup | None = None,
                 rows: np.ndarray | None = None, batch_size: int = 256, device: torch.device | str | None = None,
                 progress: bool = False, label_ids: np.ndarray | None = None) -> np.ndarray:
    """float32 [n, hidden] embeddings of ``rows`` (default: all) of ``tokens``, in the order of ``rows``.

    ``images`` gives the image features of token rows (see :func:`array_images`; a feature bank's ``get`` for a
    split works too). Batches group items of similar length (sorted by length) so dynamic padding trims most of the
    width. Labels: ``label_ids`` (aligned with ``tokens``) are the label rows the items are; the result is then the
    vectors labels are scored with (:meth:`Embedder.label_vectors`: PRIME prototypes when the model has them).
    """
    rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    device = torch.device(device) if device is not None else next(embedder.parameters()).device
    order = np.argsort(np.asarray(tokens.lengths[rows]), kind="stable")
    out = np.empty((len(rows), embedder.hidden_size), dtype=np.float32)
    was_training = embedder.training
    embedder.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(rows), batch_size), desc="embed", disable=not progress):
                positions = order[start:start + batch_size]
                batch_rows = rows[positions]
                batch = tokens.take(batch_rows)
                feats = mask = None
                if images is not None:
                    feats, mask = images(batch_rows)
                    feats = torch.as_tensor(np.asarray(feats, dtype=np.float32), device=device)
                    if mask is not None:
                        mask = torch.as_tensor(np.asarray(mask, dtype=bool), device=device)
                emb = embedder(torch.as_tensor(batch.ids, dtype=torch.long, device=device),
                               torch.as_tensor(batch.lengths, dtype=torch.long, device=device), feats, mask)
                if label_ids is not None:
                    emb = embedder.label_vectors(emb, torch.as_tensor(label_ids[batch_rows], device=device))
                out[positions] = emb.float().cpu().numpy()
    finally:
        embedder.train(was_training)
    return out
