"""The triplet loss: zero when positives win by the margin, gradients otherwise, true pairs never negatives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vixml_ray.train.loss import TripletLossConfig, triplet_loss


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_zero_when_every_positive_beats_every_negative_by_the_margin() -> None:
    q = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]).requires_grad_()
    labels = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]).requires_grad_()
    pos = torch.tensor([0, 1])
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = True
    loss = triplet_loss(q, labels, pos, mask)  # s_p = 1, every s_n = 0: gap 1 > margin_max
    assert loss.item() == 0.0
    loss.backward()
    assert q.grad.abs().sum() == 0 and labels.grad.abs().sum() == 0


def test_value_and_gradient_when_a_negative_violates() -> None:
    q = _unit([1.0, 0.0]).requires_grad_()
    labels = _unit([1.0, 1.0], [1.0, 0.2]).requires_grad_()  # the negative is closer than the positive
    pos = torch.tensor([0])
    mask = torch.tensor([[True, False]])
    cfg = TripletLossConfig(num_negatives=10, margin_min=0.1, margin_max=0.3)
    loss = triplet_loss(q, labels, pos, mask, cfg)
    s_p, s_n = (q @ labels.T)[0].tolist()
    expected = s_n - s_p + min(max(abs(s_p - s_n), 0.1), 0.3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert q.grad.norm() > 0 and labels.grad[0].norm() > 0 and labels.grad[1].norm() > 0
    # the margin is detached: the gradient is that of s_n - s_p
    assert torch.allclose(labels.grad[1], q.detach()[0], atol=1e-6)


def test_a_positive_ahead_by_less_than_margin_min_is_penalised() -> None:
    q = _unit([1.0, 0.0])
    labels = F.normalize(torch.tensor([[1.0, 0.3], [1.0, 0.35]]), dim=1)  # s_p - s_n is tiny but positive
    loss = triplet_loss(q, labels, torch.tensor([0]), torch.tensor([[True, False]]))
    s_p, s_n = (q @ labels.T)[0].tolist()
    assert 0 < s_p - s_n < 0.1
    assert loss.item() == pytest.approx(s_n - s_p + 0.1, abs=1e-6)


def test_true_in_batch_positives_are_never_negatives() -> None:
    torch.manual_seed(0)
    q = F.normalize(torch.randn(2, 8), dim=1)
    labels = F.normalize(torch.randn(5, 8), dim=1)
    labels[4] = F.normalize(q[0] + q[1], dim=0)  # the closest label to both queries, a true label of both
    pos = torch.tensor([0, 1])  # ... but not the one they sampled
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[torch.arange(2), pos] = True
    mask[:, 4] = True
    for cfg in (TripletLossConfig(num_negatives=4), TripletLossConfig(num_negatives=4, label_to_query=True),
                TripletLossConfig(num_negatives=1, softmax_weighting=True)):
        leaf = labels.clone().requires_grad_()
        loss = triplet_loss(q, leaf, pos, mask, cfg)
        loss.backward()
        assert loss.item() > 0
        assert leaf.grad[4].abs().sum() == 0
    # without the mask it is the hardest negative of both queries
    leaf = labels.clone().requires_grad_()
    triplet_loss(q, leaf, pos, mask & (torch.arange(5) != 4), TripletLossConfig(num_negatives=1)).backward()
    assert leaf.grad[4].abs().sum() > 0 and leaf.grad[2:4].abs().sum() == 0


def test_only_the_hardest_negatives_count() -> None:
    q = _unit([1.0, 0.0])
    angles = torch.tensor([0.3, 0.1, 0.2, 1.5, 1.4])  # label 0 positive; 1, 2 hardest negatives
    labels = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).requires_grad_()
    mask = torch.tensor([[True, False, False, False, False]])
    loss = triplet_loss(q, labels, torch.tensor([0]), mask, TripletLossConfig(num_negatives=2))
    loss.backward()
    assert loss.item() > 0
    assert labels.grad[1].norm() > 0 and labels.grad[2].norm() > 0
    assert labels.grad[3].norm() == 0 and labels.grad[4].norm() == 0


def test_softmax_weighting_and_averaging_over_queries() -> None:
    torch.manual_seed(1)
    q = F.normalize(torch.randn(5, 16), dim=1)
    labels = F.normalize(torch.randn(7, 16), dim=1)
    pos = torch.tensor([0, 1, 2, 3, 4])
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[torch.arange(5), pos] = True
    plain = triplet_loss(q, labels, pos, mask, TripletLossConfig(num_negatives=6))
    per_query = [triplet_loss(q[i : i + 1], labels, pos[i : i + 1], mask[i : i + 1], TripletLossConfig(num_negatives=6))
                 for i in range(5)]
    assert plain.item() == pytest.approx(sum(p.item() for p in per_query) / 5, rel=1e-5)
    weighted = triplet_loss(q, labels, pos, mask, TripletLossConfig(num_negatives=6, softmax_weighting=True))
    assert 0 < weighted.item() < plain.item()  # a convex combination per query instead of a sum


def test_label_to_query_adds_the_reverse_direction() -> None:
    torch.manual_seed(2)
    q = F.normalize(torch.randn(4, 8), dim=1)
    labels = F.normalize(torch.randn(4, 8), dim=1)
    pos = torch.arange(4)
    mask = torch.eye(4, dtype=torch.bool)
    one_way = triplet_loss(q, labels, pos, mask)
    both = triplet_loss(q, labels, pos, mask, TripletLossConfig(label_to_query=True))
    reverse = triplet_loss(labels, q, pos, mask.T)  # labels as anchors against the queries (symmetric batch)
    assert both.item() == pytest.approx(one_way.item() + reverse.item(), rel=1e-5)


def test_rejects_a_mask_without_the_sampled_positive() -> None:
    q, labels = _unit([1.0, 0.0]), _unit([1.0, 0.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="sampled positive"):
        triplet_loss(q, labels, torch.tensor([0]), torch.tensor([[False, True]]))
