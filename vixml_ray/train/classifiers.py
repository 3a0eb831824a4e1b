"""The frozen-encoder stage of the per-label classifier vectors (``model.classifiers``, ``train.classifier_loss``).

Input: the embeddings of the training queries (computed once, by the final encoder) and their labels. Each label
with training queries gets a vector ``w_l``, starting at the exact centroid of its queries' embeddings
(:func:`~vixml_ray.train.prototypes.label_centroids`); labels without training queries are left out (they keep
their Siamese vector when served). An epoch:

1. shortlist: the ``shortlist`` top labels of every query under the current ``normalize(w)`` (exact, by blocks of
   one matmul; every rank searches an equal share of the queries, the shares are all-gathered);
2. batches of ``batch_size`` queries (whole clusters of ``cluster_size`` similar queries, clustered once: the
   embeddings do not change); a batch's candidates are the union of its queries' positives and shortlists; each
   (query, positive) pair costs ``softplus(logsumexp_n(s_n / T) - s_p / T)`` over the candidates ``n`` that are not
   the query's positives (cosine scores ``s``, temperature ``T``), averaged over the batch's pairs;
3. a row-wise Adagrad step (``torch.optim.Adagrad`` on sparse gradients of an ``nn.Embedding``): only the batch's
   candidate rows and their optimiser state are touched.

Distribution (DDP/ZeRO ranks): the vectors are replicated, every rank computes the same global batches and
candidates, takes its share of the batch's queries (:func:`~vixml_ray.train.sampler.rank_slice`) and the
candidates' gradient rows are summed over ranks (one all-reduce of ``[candidates, H]``): N ranks take exactly the
steps one process would. Replicated rather than sharded because the stage is cheap next to the encoder and a
million labels x 384 fp32 (1.5 GB, plus as much Adagrad state) fits every worker; the rows a step touches are few.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from vixml_ray.config import ClassifierLossConfig
from vixml_ray.train import dist
from vixml_ray.train.clustering import balanced_clusters
from vixml_ray.train.prototypes import label_centroids
from vixml_ray.train.sampler import GlobalBatchSampler, rank_slice

log = logging.getLogger(__name__)

_SALT = 0xC1A5  # the stage's batch-order stream


@dataclass
class ClassifierResult:
    """The trained vectors: ``weight`` float32 [L, H] (zero rows for labels without training queries), ``trained``
    bool [L], and the per-epoch history (mean loss, seconds)."""

    weight: np.ndarray
    trained: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.history)


def shortlist(query_emb: torch.Tensor, weight: torch.Tensor, label_ids: torch.Tensor, k: int,
              max_scores: int = 1 << 24) -> np.ndarray:
    """int64 [N, k]: the ``k`` labels (of ``label_ids``) with the highest cosine score for each query, computed by
    all ranks together (each an equal share of the queries) in blocks of at most ``max_scores`` scores."""
    n = len(query_emb)
    world = dist.world_size()
    share = -(-n // world)
    mine = query_emb[dist.rank() * share:(dist.rank() + 1) * share]
    k = min(k, len(label_ids))
    out = np.zeros((share, k), dtype=np.int64)
    with torch.no_grad():
        vectors = F.normalize(weight[label_ids].float(), dim=-1)
        step = max(1, max_scores // max(1, len(label_ids)))
        for lo in range(0, len(mine), step):
            top = (mine[lo:lo + step] @ vectors.T).topk(k, dim=1).indices
            out[lo:lo + len(top)] = label_ids[top].cpu().numpy()
    return dist.all_gather_array(out, [share] * world)[:n]


@dataclass
class ClassifierBatch:
    """One global batch: its candidate labels (sorted, unique; the same on every rank) and this rank's queries."""

    candidates: np.ndarray  # int64 [C]
    queries: torch.Tensor  # float32 [b, H] this rank's share of the batch
    positives: torch.Tensor  # bool [b, C]: candidate c is a positive of query i
    num_pairs: int  # (query, positive) pairs of the whole global batch


def make_batch(rows: np.ndarray, query_emb: torch.Tensor, labels: sp.csr_matrix, short: np.ndarray | None
               ) -> ClassifierBatch:
    """The :class:`ClassifierBatch` of the global batch ``rows`` (positions in ``query_emb``/``labels``)."""
    pos = labels[rows]
    parts = [pos.indices.astype(np.int64)] + ([short[rows].ravel()] if short is not None else [])
    candidates = np.unique(np.concatenate(parts))
    mine = rank_slice(np.asarray(rows), dist.rank(), dist.world_size())
    local = labels[mine].tocoo()
    mask = torch.zeros(len(mine), len(candidates), dtype=torch.bool)
    mask[torch.as_tensor(local.row, dtype=torch.long),
         torch.as_tensor(np.searchsorted(candidates, local.col), dtype=torch.long)] = True
    return ClassifierBatch(candidates, query_emb[mine], mask.to(query_emb.device), int(pos.nnz))


def batch_loss(table: nn.Embedding, batch: ClassifierBatch, temperature: float) -> torch.Tensor:
    """This rank's part of the global batch's mean softmax loss (the parts of all ranks sum to it)."""
    ids = torch.as_tensor(batch.candidates, device=table.weight.device)
    vectors = F.normalize(table(ids), dim=-1)
    scores = batch.queries @ vectors.T / temperature  # [b, C]
    negatives = torch.logsumexp(scores.masked_fill(batch.positives, float("-inf")), dim=1, keepdim=True)
    pairs = F.softplus(negatives - scores)[batch.positives]  # a query without negatives: softplus(-inf) = 0
    return pairs.sum() / max(1, batch.num_pairs)


def batch_gradient(table: nn.Embedding, batch: ClassifierBatch, temperature: float) -> tuple[float, torch.Tensor]:
    """(the global batch's loss, the gradient rows [C, H] of its candidates summed over ranks), the same on every
    rank; ``table.weight.grad`` is left holding that gradient as a sparse tensor."""
    table.zero_grad(set_to_none=True)
    loss = batch_loss(table, batch, temperature)
    loss.backward()
    grad = table.weight.grad.coalesce()  # every candidate was looked up: its indices are the sorted candidates
    values = grad.values().contiguous()
    total = loss.detach().reshape(1).clone()
    if dist.is_distributed():
        torch_dist.all_reduce(values)
        torch_dist.all_reduce(total)
    table.weight.grad = torch.sparse_coo_tensor(grad.indices(), values, grad.shape,
                                                is_coalesced=True, check_invariants=False)
    return float(total), values


def train_classifiers(query_emb: np.ndarray, labels: sp.csr_matrix, cfg: ClassifierLossConfig, seed: int,
                      device: torch.device, stop: Callable[[], bool] = lambda: False) -> ClassifierResult:
    """Trains the classifier vectors of the labels of ``labels`` [N, L] on the query embeddings ``query_emb``
    [N, H] (the same on every rank) for ``cfg.epochs`` epochs, or until ``stop()`` (checked after every batch;
    it must answer the same on every rank) says the time is up."""
    labels = sp.csr_matrix(labels).astype(bool).astype(np.float32)
    weight, trained = label_centroids(query_emb, labels)
    result = ClassifierResult(weight, trained)
    if cfg.epochs == 0 or not trained.any() or stop():
        return result
    queries = torch.as_tensor(np.asarray(query_emb, dtype=np.float32), device=device)
    table = nn.Embedding.from_pretrained(torch.as_tensor(weight, device=device), freeze=False, sparse=True)
    optimizer = torch.optim.Adagrad(table.parameters(), lr=cfg.lr)
    label_ids = torch.as_tensor(np.flatnonzero(trained), device=device)
    sampler = GlobalBatchSampler(np.arange(len(queries)), cfg.batch_size, seed + _SALT)
    if cfg.cluster_size is not None and len(queries) > cfg.cluster_size:
        ids = balanced_clusters(query_emb, cfg.cluster_size, seed=seed) if dist.rank() == 0 else None
        sampler.set_clusters(dist.broadcast_object(ids), cfg.cluster_size)
    halted = False
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        short = shortlist(queries, table.weight, label_ids, cfg.shortlist) if cfg.shortlist else None
        losses = []
        for rows in sampler.epoch_batches(epoch):
            loss, _ = batch_gradient(table, make_batch(rows, queries, labels, short), cfg.temperature)
            with torch.sparse.check_sparse_tensor_invariants(enable=False):  # Adagrad builds valid sparse updates
                optimizer.step()
            losses.append(loss)
            if stop():
                halted = True
                break
        seconds = time.perf_counter() - start
        result.history.append({"epoch": epoch, "loss": float(np.mean(losses)), "seconds": seconds,
                               "batches": len(losses)})
        log.info("classifier epoch %d: loss %.4f, %d batches in %.1f s", epoch, np.mean(losses), len(losses), seconds)
        if halted:
            break
    result.weight = table.weight.detach().cpu().numpy()
    result.weight[~trained] = 0.0
    return result
