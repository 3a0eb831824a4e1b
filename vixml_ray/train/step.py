"""One training step on a global batch: this rank's share of the inputs, one forward, all-gather, loss, update.

The items of a global batch are its B queries followed by its M unique labels (the union of the sampled positives);
each rank embeds a contiguous near-equal share of these B + M items (every query and every label exactly once across
ranks), the embeddings are all-gathered with gradients flowing back to the local share, and every rank computes the
triplet loss of the whole global batch. With PRIME prototypes, each rank also turns its share of the labels into
prototypes inside the same forward, and those are all-gathered the same way (:func:`~vixml_ray.train.loss.prime_loss`).
With classifier vectors trained jointly (``train.classifier_loss.joint``) a global batch is its queries only, and the
loss is the classifier loss of :mod:`vixml_ray.train.classifiers` (:func:`classifier_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from vixml_ray.model.tokens import TokenArrays
from vixml_ray.train import dist
from vixml_ray.train.classifiers import ClassifierTable, joint_loss
from vixml_ray.train.engine import Engine
from vixml_ray.train.loss import PrimeLossConfig, TripletLossConfig, prime_loss, triplet_loss
from vixml_ray.train.positives import BatchTargets, batch_targets
from vixml_ray.train.sampler import slice_bounds
from vixml_ray.vision.bank import FeatureBank


@dataclass
class StepBatch:
    """What one rank needs for one step of a global batch."""

    targets: BatchTargets  # the global batch's labels, sampled positives and true pairs
    sizes: list[int]  # items (queries + labels) embedded by each rank
    label_sizes: list[int]  # labels among them, per rank (they come after the rank's queries)
    chunks: int  # embedder calls per rank (equal on all ranks)
    ids: torch.Tensor  # long [n_local, width] this rank's items, padded to their longest
    lengths: torch.Tensor  # long [n_local]
    feats: torch.Tensor | None  # float [n_local, slots, dim]
    mask: torch.Tensor | None  # bool [n_local, slots]
    label_rows: torch.Tensor  # long [label_sizes[rank]] the label ids of this rank's labels

    @property
    def num_queries(self) -> int:
        return len(self.targets.pos_index)


def make_step_batch(rows: np.ndarray, sampled: np.ndarray, labels: sp.csr_matrix, query_tokens: TokenArrays,
                    label_tokens: TokenArrays | None, images: FeatureBank | None, chunk_rows: int,
                    device: torch.device) -> StepBatch:
    """This rank's share of the global batch ``rows`` (training query rows) with positives ``sampled[rows]``; its
    queries only when ``label_tokens`` is None."""
    targets = batch_targets(labels, rows, sampled)
    label_ids = targets.label_ids if label_tokens is not None else targets.label_ids[:0]
    num_q, world = len(rows), dist.world_size()
    bounds = slice_bounds(num_q + len(label_ids), world)
    lo, hi = int(bounds[dist.rank()]), int(bounds[dist.rank() + 1])
    q_rows = rows[lo:min(hi, num_q)]
    l_rows = label_ids[max(lo, num_q) - num_q : max(hi, num_q) - num_q]
    parts = [(query_tokens, "train", q_rows), (label_tokens, "label", l_rows)]
    parts = [(tokens, split, r) for tokens, split, r in parts if len(r)]
    taken = [tokens.take(r) for tokens, _, r in parts]
    width = max(t.ids.shape[1] for t in taken)
    ids = np.concatenate([np.pad(t.ids, ((0, 0), (0, width - t.ids.shape[1]))) for t in taken])
    lengths = np.concatenate([t.lengths for t in taken])
    feats = mask = None
    if images is not None:
        got = [images.get(split, r) for _, split, r in parts]
        feats = torch.cat([f for f, _ in got]).to(device=device, dtype=torch.float32)
        mask = torch.cat([m for _, m in got]).to(device=device, dtype=torch.bool)
    sizes = np.diff(bounds).tolist()
    label_sizes = [int(max(b, num_q) - max(a, num_q)) for a, b in zip(bounds[:-1], bounds[1:])]
    return StepBatch(
        targets=targets,
        sizes=sizes,
        label_sizes=label_sizes,
        chunks=max(1, math.ceil(max(sizes) / chunk_rows)),
        ids=torch.as_tensor(ids, dtype=torch.long, device=device),
        lengths=torch.as_tensor(lengths, dtype=torch.long, device=device),
        feats=feats,
        mask=mask,
        label_rows=torch.as_tensor(np.asarray(l_rows, dtype=np.int64), device=device),
    )


def forward_loss(engine: Engine, batch: StepBatch, loss_cfg: TripletLossConfig,
                 prime: PrimeLossConfig | None = None) -> torch.Tensor:
    """The global batch's loss (the same value on every rank), differentiable w.r.t. this rank's share: the
    triplet loss, or with ``prime`` (a model with prototypes) the PRIME objective."""
    if prime is None:
        local = engine.module(batch.ids, batch.lengths, batch.feats, batch.mask, batch.chunks)
    else:
        local, local_protos = engine.module(batch.ids, batch.lengths, batch.feats, batch.mask, batch.chunks,
                                            batch.label_rows)
    items = dist.all_gather(local, batch.sizes)
    num_q = batch.num_queries
    device = items.device
    pos_index = torch.as_tensor(batch.targets.pos_index, device=device)
    positive_mask = torch.as_tensor(batch.targets.positive_mask, device=device)
    if prime is None:
        return triplet_loss(items[:num_q], items[num_q:], pos_index, positive_mask, loss_cfg)
    protos = dist.all_gather(local_protos, batch.label_sizes)
    return prime_loss(items[:num_q], items[num_q:], protos, pos_index, positive_mask, loss_cfg, prime)


def classifier_step(engine: Engine, batch: StepBatch, table: ClassifierTable, positions: np.ndarray,
                    labels: sp.csr_matrix, short: np.ndarray | None) -> tuple[float, float]:
    """A joint step on a queries-only ``batch``: the classifier loss of the whole global batch (``positions``: its
    rows in ``labels`` and ``short``) trains the encoder through the engine and the candidates' vectors by row-wise
    Adagrad; returns (loss, gradient norm of the encoder before clipping)."""
    local = engine.module(batch.ids, batch.lengths, batch.feats, batch.mask, batch.chunks)
    queries = dist.all_gather(local, batch.sizes)
    loss = joint_loss(table, queries, positions, labels, short)
    world = dist.world_size()
    engine.backward(loss * world)  # as in train_step; each rank's vector gradient is then world x the full one
    grad_norm = engine.step()
    table.step(scale=1.0 / world)
    return float(loss.detach()), grad_norm


def train_step(engine: Engine, batch: StepBatch, loss_cfg: TripletLossConfig,
               prime: PrimeLossConfig | None = None) -> tuple[float, float]:
    """Forward, backward and update; returns (loss, gradient norm before clipping)."""
    loss = forward_loss(engine, batch, loss_cfg, prime)
    # every rank holds the whole loss but only its share's gradient; DDP/DeepSpeed average over ranks -> x world
    engine.backward(loss * dist.world_size())
    grad_norm = engine.step()
    return float(loss.detach()), grad_norm
