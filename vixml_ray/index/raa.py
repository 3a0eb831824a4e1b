"""Retrieval-augmented inference (RAA, the paper's headline inference): the training queries nearest to a query
vote for their labels,

    score(l) = lam * s(q, l) + (1 - lam) * sum_{j in N(q)} softmax_j(s(q, q_j) / temperature) * y_jl

with ``N(q)`` the ``neighbors`` nearest training queries and ``y`` the binary training label matrix.

Candidates are the label index's top ``K >= k`` labels and every voted label; a voted label outside the top K gets
its exact ``s(q, l)`` from the shards that hold it. Every candidate's score is the formula, and the result is the
exact top-k of the formula over ALL labels: a label that is neither voted nor in the top K scores
``lam * s(q, l) <= lam * s_K``, which the K top labels already reach (ties by label id, as in plain search).
With ``lam = 1`` the scores are ``s(q, l)`` bit for bit and the result is plain label search.

A model with a lexical head (``model.lexical``, :mod:`vixml_ray.model.lexical`) adds ``weight * h(q, l)`` to every
candidate's score, with or without RAA; the index's top ``model.lexical.candidates`` labels join the candidates
(NGAME's re-ranking of a shortlist: a label outside the candidates keeps no score, so the result is the exact top-k
of the formula over the candidates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp

from vixml_ray.config import RetrievalAugmentationConfig
from vixml_ray.data.filters import filter_predictions
from vixml_ray.errors import IncompatibleArtifactError
from vixml_ray.index.sharded import IndexView, SearchResult, ShardedIndex, exclusion_pairs
from vixml_ray.index.versions import LABELS, QUERIES, Manifest
from vixml_ray.model.lexical import LexicalHead

ExactScores = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (query rows, label ids) -> s(q, l) per pair


@dataclass
class LexicalTerm:
    """The lexical head's term for one batch of queries: ``weight * h(q, l)`` of (query row, label) pairs."""

    head: LexicalHead
    features: sp.csr_matrix  # the batch's TF-IDF rows (LexicalHead.features of its texts)
    weight: float
    candidates: int  # the index's top labels per query that join the candidates

    @classmethod
    def of(cls, head: LexicalHead | None, texts: list[str]) -> "LexicalTerm | None":
        """The term of ``head`` for queries ``texts`` (None without a head)."""
        return None if head is None else cls(head, head.features(texts), head.cfg.weight, head.cfg.candidates)

    def __call__(self, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.weight * self.head.pair_scores(self.features, rows, labels)


def served_parts(raa: RetrievalAugmentationConfig, manifest: Manifest, index_dir: str) -> tuple[str, ...]:
    """The index parts an inference job serves: labels, plus the training queries when ``raa.enabled`` (then the
    version must hold them)."""
    if not raa.enabled:
        return (LABELS,)
    if not manifest.has_part(QUERIES):
        raise IncompatibleArtifactError(f"'infer.raa.enabled' is true but index version {manifest.version} of "
                                        f"{index_dir} holds no training-query embeddings; refresh the index with "
                                        "infer.raa.enabled=true (or set infer.raa.enabled=false)")
    return (LABELS, QUERIES)


def vote_matrix(neighbor_ids: np.ndarray, neighbor_scores: np.ndarray, train_labels: sp.csr_matrix,
                temperature: float) -> sp.csr_matrix:
    """The votes ``sum_j softmax_j(s(q, q_j) / temperature) * y_jl`` as a (queries x labels) float64 CSR matrix
    (sorted indices, no explicit zeros); ``neighbor_ids`` (-1 = no neighbour) index the rows of ``train_labels``."""
    valid = neighbor_ids >= 0
    logits = np.where(valid, neighbor_scores.astype(np.float64) / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))  # 0 where no neighbour
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    indptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
    neighbours = sp.csr_matrix((weights[valid], neighbor_ids[valid], indptr),
                               shape=(len(neighbor_ids), train_labels.shape[0]))
    votes = (neighbours @ train_labels).tocsr()
    votes.eliminate_zeros()
    votes.sort_indices()
    return votes


def combine(label_ids: np.ndarray, label_scores: np.ndarray, votes: sp.csr_matrix, exact_scores: ExactScores,
            lam: float, k: int, extra: ExactScores | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` (ids int64, scores float32) of ``lam * s + (1 - lam) * votes (+ extra)`` per query over the
    candidates: the label top-K (``label_ids`` / ``label_scores``, -1 padded) and every voted label (``exact_scores``
    gives ``s`` for the voted labels outside the top-K); ``extra`` (e.g. a :class:`LexicalTerm`) adds a term per
    candidate pair. Ranked in float64 by (-score, label id); -1 / -inf padding."""
    nq, num_labels = votes.shape
    valid = label_ids >= 0
    top_rows = np.repeat(np.arange(nq, dtype=np.int64), valid.sum(axis=1))
    top_labels = label_ids[valid].astype(np.int64)
    top_keys = top_rows * num_labels + top_labels
    vote_rows = np.repeat(np.arange(nq, dtype=np.int64), np.diff(votes.indptr))
    vote_labels = votes.indices.astype(np.int64)
    vote_keys = vote_rows * num_labels + vote_labels  # ascending: rows in order, sorted indices within
    at = np.searchsorted(vote_keys, top_keys)
    hit = at < len(vote_keys)
    hit[hit] = vote_keys[at[hit]] == top_keys[hit]
    top_votes = np.zeros(len(top_keys))
    top_votes[hit] = votes.data[at[hit]]
    outside = np.ones(len(vote_keys), dtype=bool)
    outside[at[hit]] = False
    out_rows, out_labels = vote_rows[outside], vote_labels[outside]
    out_s = np.asarray(exact_scores(out_rows, out_labels), dtype=np.float32) if len(out_rows) else np.zeros(0)

    rows = np.concatenate([top_rows, out_rows])
    labels = np.concatenate([top_labels, out_labels])
    s = np.concatenate([label_scores[valid].astype(np.float64), out_s.astype(np.float64)])
    score = lam * s + (1.0 - lam) * np.concatenate([top_votes, votes.data[outside]])
    if extra is not None:
        score = score + extra(rows, labels)
    order = np.lexsort((labels, -score, rows))
    rows, labels, score = rows[order], labels[order], score[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within the query's candidates
    keep = rank < k
    ids = np.full((nq, k), -1, dtype=np.int64)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids[rows[keep], rank[keep]] = labels[keep]
    scores[rows[keep], rank[keep]] = score[keep]
    return ids, scores


def augmented_search(view: IndexView, queries: np.ndarray, k: int, raa: RetrievalAugmentationConfig,
                     train_labels: sp.csr_matrix | None, exclude: np.ndarray | None = None,
                     lexical: LexicalTerm | None = None) -> SearchResult:
    """The top-k labels of each query row from one pinned index generation, retrieval-augmented with
    ``raa.enabled`` (the version serves labels and training queries; ``train_labels`` is its (training queries x
    labels) matrix) and/or re-ranked by ``lexical``. ``exclude``: (query row, label) pairs removed AFTER combining
    (the combined top is fetched ``max exclusions per row`` deeper)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pairs, extra = exclusion_pairs(exclude, len(queries))
    fetch = k + extra
    depth = max(fetch, lexical.candidates if lexical is not None else 0)
    if raa.enabled:
        expected = (view.manifest.num_rows(QUERIES), view.manifest.num_labels)
        if train_labels is None or train_labels.shape != expected:
            shape = None if train_labels is None else train_labels.shape
            raise ValueError(f"train_labels is {shape}, index version {view.version} needs {expected}")
        top = view.search(queries, max(raa.neighbors, depth))
        neighbours = view.search(queries, raa.neighbors, part=QUERIES)
        votes = vote_matrix(neighbours.ids, neighbours.scores, train_labels, raa.temperature)
        lam = raa.lam
    else:
        top = view.search(queries, depth)
        votes, lam = sp.csr_matrix((len(queries), view.manifest.num_labels)), 1.0
    ids, scores = combine(top.ids, top.scores, votes, lambda rows, labels: view.pair_scores(queries, rows, labels),
                          lam, fetch, lexical)
    if pairs is not None:
        ids, scores = filter_predictions(ids, scores, pairs)
    return SearchResult(scores[:, :k], ids[:, :k], view.version)


def search_labels(index: ShardedIndex, queries: np.ndarray, k: int, raa: RetrievalAugmentationConfig,
                  train_labels: Callable[[Manifest], sp.csr_matrix], exclude: np.ndarray | None = None,
                  lexical: LexicalTerm | None = None) -> SearchResult:
    """The top-k labels of each query row: plain label search, or with ``raa.enabled`` or a ``lexical`` term
    :func:`augmented_search` on one pinned version (``train_labels(manifest)`` gives that version's training label
    matrix, asked for only with ``raa.enabled``)."""
    if not raa.enabled and lexical is None:
        return index.search(queries, k, exclude=exclude)
    with index.pinned() as view:
        labels = train_labels(view.manifest) if raa.enabled else None
        return augmented_search(view, queries, k, raa, labels, exclude, lexical)
