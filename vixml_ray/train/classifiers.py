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

``joint`` (:func:`joint_loss`, run by the training loop's steps): the stage above runs first on the initial encoder;
then each step encodes its global batch's queries (each rank its share, all-gathered with gradients flowing back to
it) and the same loss trains the encoder and the vectors together. Every rank computes the whole global batch's
loss from the same gathered queries, so every rank holds the same full gradient of the vectors: no all-reduce, the
same row-wise Adagrad step everywhere.

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


class ClassifierTable:
    """The trainable vectors of the labels with training queries (``trained``): a sparse ``nn.Embedding`` of all L
    labels and its row-wise ``torch.optim.Adagrad`` (a step touches only the rows of its batch's candidates)."""

    def __init__(self, weight: np.ndarray, trained: np.ndarray, cfg: ClassifierLossConfig, device: torch.device):
        self.cfg = cfg
        self.trained = np.asarray(trained, dtype=bool)
        self.embedding = nn.Embedding.from_pretrained(torch.as_tensor(np.asarray(weight, dtype=np.float32),
                                                                      device=device), freeze=False, sparse=True)
        self.optimizer = torch.optim.Adagrad(self.embedding.parameters(), lr=cfg.lr)
        self.label_ids = torch.as_tensor(np.flatnonzero(self.trained), device=device)

    def shortlist(self, query_emb: torch.Tensor) -> np.ndarray | None:
        """The ``cfg.shortlist`` top labels of every query (None when the shortlist is 0)."""
        return shortlist(query_emb, self.embedding.weight, self.label_ids, self.cfg.shortlist) \
            if self.cfg.shortlist else None

    def step(self, scale: float = 1.0) -> None:
        """An Adagrad step on the rows of the current sparse gradient, multiplied by ``scale`` first (Adagrad
        coalesces the gradient itself)."""
        if scale != 1.0:
            grad = self.embedding.weight.grad.coalesce()
            self.embedding.weight.grad = torch.sparse_coo_tensor(grad.indices(), grad.values() * scale, grad.shape,
                                                                 is_coalesced=True, check_invariants=False)
        with torch.sparse.check_sparse_tensor_invariants(enable=False):  # Adagrad builds valid sparse updates
            self.optimizer.step()
        self.embedding.zero_grad(set_to_none=True)

    def weight(self) -> np.ndarray:
        """float32 [L, H]: the vectors, zero rows for labels without training queries."""
        weight = self.embedding.weight.detach().cpu().numpy().copy()
        weight[~self.trained] = 0.0
        return weight

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.embedding.weight.detach().cpu(), "trained": torch.as_tensor(self.trained),
                "optimizer": self.optimizer.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], cfg: ClassifierLossConfig, device: torch.device
                        ) -> "ClassifierTable":
        table = cls(state["weight"].numpy(), state["trained"].numpy(), cfg, device)
        table.optimizer.load_state_dict(state["optimizer"])
        return table


@dataclass
class ClassifierResult:
    """The trained vectors: ``weight`` float32 [L, H] (zero rows for labels without training queries), ``trained``
    bool [L], the per-epoch history (mean loss, seconds) and the :class:`ClassifierTable` (None when no epoch ran)."""

    weight: np.ndarray
    trained: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    table: ClassifierTable | None = None

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
    """One global batch: its candidate labels (sorted, unique; the same on every rank) and its queries (this rank's
    share, or all of them)."""

    candidates: np.ndarray  # int64 [C]
    queries: torch.Tensor | None  # float32 [b, H]
    positives: torch.Tensor  # bool [b, C]: candidate c is a positive of query i
    num_pairs: int  # (query, positive) pairs of the whole global batch


def make_batch(rows: np.ndarray, query_emb: torch.Tensor | None, labels: sp.csr_matrix, short: np.ndarray | None,
               share: bool = True, device: torch.device | None = None) -> ClassifierBatch:
    """The :class:`ClassifierBatch` of the global batch ``rows`` (positions in ``query_emb``/``labels``): this
    rank's share of its queries, or with ``share=False`` all of them (``query_emb`` None: the caller sets them)."""
    rows = np.asarray(rows)
    pos = labels[rows]
    parts = [pos.indices.astype(np.int64)] + ([short[rows].ravel()] if short is not None else [])
    candidates = np.unique(np.concatenate(parts))
    mine = rank_slice(rows, dist.rank(), dist.world_size()) if share else rows
    local = labels[mine].tocoo()
    mask = torch.zeros(len(mine), len(candidates), dtype=torch.bool)
    mask[torch.as_tensor(local.row, dtype=torch.long),
         torch.as_tensor(np.searchsorted(candidates, local.col), dtype=torch.long)] = True
    device = query_emb.device if query_emb is not None else device
    return ClassifierBatch(candidates, query_emb[mine] if query_emb is not None else None, mask.to(device),
                           int(pos.nnz))


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


def joint_loss(table: ClassifierTable, queries: torch.Tensor, rows: np.ndarray, labels: sp.csr_matrix,
               short: np.ndarray | None) -> torch.Tensor:
    """The whole global batch's loss for ``queries`` [B, H] (the encoder's embeddings of the training rows ``rows``,
    all ranks' shares gathered in order): differentiable w.r.t. the queries and the candidates' vectors."""
    batch = make_batch(rows, None, labels, short, share=False, device=queries.device)
    batch.queries = queries
    return batch_loss(table.embedding, batch, table.cfg.temperature)


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
    table = result.table = ClassifierTable(weight, trained, cfg, device)  # shares ``weight``'s memory
    queries = torch.as_tensor(np.asarray(query_emb, dtype=np.float32), device=device)
    sampler = GlobalBatchSampler(np.arange(len(queries)), cfg.batch_size, seed + _SALT)
    if cfg.cluster_size is not None and len(queries) > cfg.cluster_size:
        ids = balanced_clusters(query_emb, cfg.cluster_size, seed=seed) if dist.rank() == 0 else None
        sampler.set_clusters(dist.broadcast_object(ids), cfg.cluster_size)
    halted = False
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        short = table.shortlist(queries)
        losses = []
        for rows in sampler.epoch_batches(epoch):
            loss, _ = batch_gradient(table.embedding, make_batch(rows, queries, labels, short), cfg.temperature)
            table.step()
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
    result.weight = table.weight()
    return result
