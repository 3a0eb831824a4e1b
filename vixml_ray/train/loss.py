"""Triplet loss with in-batch hard negatives (NGAME / PRIME), on the GLOBAL batch.

Pure tensor code: the caller passes the query and label embeddings of the whole global batch (all-gathered across
ranks, see :mod:`vixml_ray.train.dist`), the index of each query's sampled positive among the batch's labels, and the
mask of every true (query, label) pair of the batch from the full label sets. Every true pair is excluded from the
negatives, so a label that is also a positive of the query is never pushed away.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vixml_ray.config import TrainConfig


@dataclass(frozen=True)
class TripletLossConfig:
    num_negatives: int = 10
    margin_min: float = 0.1
    margin_max: float = 0.3
    softmax_weighting: bool = False
    temperature: float = 0.1
    label_to_query: bool = False

    @classmethod
    def from_train(cls, train: TrainConfig) -> "TripletLossConfig":
        return cls(
            num_negatives=train.num_negatives,
            margin_min=train.margin_min,
            margin_max=train.margin_max,
            softmax_weighting=train.softmax_weighting,
            temperature=train.softmax_temperature,
            label_to_query=train.label_to_query,
        )


def triplet_loss(
    q: torch.Tensor,
    labels: torch.Tensor,
    pos_index: torch.Tensor,
    positive_mask: torch.Tensor,
    cfg: TripletLossConfig = TripletLossConfig(),
) -> torch.Tensor:
    """Mean over queries of the summed hinge ``max(0, s_n - s_p + m)`` over the ``num_negatives`` hardest negatives.

    ``q`` [B, H] and ``labels`` [M, H] are embeddings (L2-normalised by the embedder); ``pos_index`` [B] is the sampled
    positive of each query (an index into ``labels``); ``positive_mask`` [B, M] marks every true pair (it must include
    the sampled ones). The margin ``m = clamp(|s_p - s_n|, margin_min, margin_max)`` is detached. With
    ``label_to_query``, the same loss with labels as anchors (each sampled pair's label against the batch's queries
    that are not its positives) is added.
    """
    if q.ndim != 2 or labels.ndim != 2 or q.shape[1] != labels.shape[1]:
        raise ValueError(f"expected q [B, H] and labels [M, H], got {tuple(q.shape)} and {tuple(labels.shape)}")
    if positive_mask.shape != (q.shape[0], labels.shape[0]):
        raise ValueError(f"positive_mask must be [B, M] = {(q.shape[0], labels.shape[0])}, got {tuple(positive_mask.shape)}")
    rows = torch.arange(q.shape[0], device=q.device)
    if not bool(positive_mask[rows, pos_index].all()):
        raise ValueError("positive_mask must mark every sampled positive (positive_mask[b, pos_index[b]])")
    scores = q @ labels.T  # [B, M]
    s_pos = scores[rows, pos_index]
    loss = _hinge(s_pos, scores, ~positive_mask, cfg)
    if cfg.label_to_query:
        # anchor: the label of each sampled pair; candidates: all queries of the batch, except its true queries
        loss = loss + _hinge(s_pos, scores.T[pos_index], ~positive_mask.T[pos_index], cfg)
    return loss


def _hinge(s_pos: torch.Tensor, candidates: torch.Tensor, negative: torch.Tensor, cfg: TripletLossConfig) -> torch.Tensor:
    """Per anchor: hinge over its ``num_negatives`` hardest negatives (``candidates`` [P, C] where ``negative``)."""
    k = min(cfg.num_negatives, candidates.shape[1])
    masked = candidates.masked_fill(~negative, float("-inf"))
    s_neg, _ = masked.topk(k, dim=1)  # [P, k], hardest first; -inf where an anchor has fewer than k negatives
    valid = torch.isfinite(s_neg)
    s_neg = torch.where(valid, s_neg, torch.zeros_like(s_neg))
    gap = s_neg - s_pos[:, None]
    margin = gap.detach().abs().clamp(cfg.margin_min, cfg.margin_max)
    hinge = torch.relu(gap + margin) * valid
    if cfg.softmax_weighting:
        violators = hinge.detach() > 0
        logits = (s_neg.detach() / cfg.temperature).masked_fill(~violators, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows without violators: all -inf -> nan -> 0
        hinge = hinge * weights
    return hinge.sum(dim=1).mean()


@dataclass(frozen=True)
class PrimeLossConfig:
    """The PRIME terms (see :class:`~vixml_ray.config.PrototypeLossConfig`); a weight of 0 skips a term."""

    text_weight: float = 1.0
    prototype_weight: float = 1.0
    label_to_query: bool = True
    regularizer_weight: float = 0.1
    regularizer_margin: float = 0.1

    @classmethod
    def from_train(cls, train: TrainConfig) -> "PrimeLossConfig":
        p = train.prototype_loss
        return cls(text_weight=p.text_weight, prototype_weight=p.prototype_weight, label_to_query=p.label_to_query,
                   regularizer_weight=p.regularizer_weight, regularizer_margin=p.regularizer_margin)


def prime_loss(
    q: torch.Tensor,
    text: torch.Tensor,
    protos: torch.Tensor,
    pos_index: torch.Tensor,
    positive_mask: torch.Tensor,
    cfg: TripletLossConfig,
    prime: PrimeLossConfig,
) -> torch.Tensor:
    """The PRIME objective on a global batch: ``text_weight`` x triplet(queries, label-text embeddings) +
    ``prototype_weight`` x triplet(queries, prototypes) (labels as anchors too with ``prime.label_to_query``) +
    ``regularizer_weight`` x :func:`prototype_regularizer`. ``text`` and ``protos`` are [M, H], row-aligned."""
    loss = q.new_zeros(())
    if prime.text_weight:
        loss = loss + prime.text_weight * triplet_loss(q, text, pos_index, positive_mask, cfg)
    if prime.prototype_weight:
        proto_cfg = replace(cfg, label_to_query=prime.label_to_query)
        loss = loss + prime.prototype_weight * triplet_loss(q, protos, pos_index, positive_mask, proto_cfg)
    if prime.regularizer_weight:
        loss = loss + prime.regularizer_weight * prototype_regularizer(
            q, text, protos, pos_index, positive_mask, cfg.num_negatives, prime.regularizer_margin)
    return loss


def prototype_regularizer(q: torch.Tensor, text: torch.Tensor, protos: torch.Tensor, pos_index: torch.Tensor,
                          positive_mask: torch.Tensor, num_negatives: int, margin: float) -> torch.Tensor:
    """Mean over queries of ``sum_c max(0, s_c - s(q, proto_p) + margin)`` where ``p`` is the sampled positive and
    ``c`` runs over its label-text score and the text scores of the ``num_negatives`` hardest text negatives: the
    prototype of a positive must beat the intermediate (label-text) space. The text scores are targets here
    (detached): this term moves the prototypes (and the queries), not the label-text embeddings."""
    rows = torch.arange(q.shape[0], device=q.device)
    s_proto = (q * protos[pos_index]).sum(dim=-1)  # [B]
    text_scores = (q @ text.T).detach()  # [B, M]
    k = min(num_negatives, text_scores.shape[1])
    s_neg, _ = text_scores.masked_fill(positive_mask, float("-inf")).topk(k, dim=1)
    competitors = torch.cat([text_scores[rows, pos_index][:, None], s_neg], dim=1)  # [B, 1 + k]
    valid = torch.isfinite(competitors)
    competitors = torch.where(valid, competitors, torch.zeros_like(competitors))
    return (torch.relu(competitors - s_proto[:, None] + margin) * valid).sum(dim=1).mean()
