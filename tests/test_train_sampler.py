"""The global batch order, the cluster schedule, rank shares and positive sampling."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from vixml_ray.config import ClusterConfig
from vixml_ray.train.positives import PositiveSampler, batch_targets
from vixml_ray.train.sampler import ClusterSchedule, GlobalBatchSampler, slice_bounds


def test_schedule_reference_decoder() -> None:
    schedule = ClusterSchedule(ClusterConfig(start_epoch=4, refresh_every=2, initial_size=16, double_at=[8, 12]))
    assert [schedule.cluster_size(e) for e in (0, 3, 4, 7, 8, 11, 12, 20)] == [None, None, 16, 16, 32, 32, 64, 64]
    assert [e for e in range(14) if schedule.refresh(e)] == [4, 6, 8, 10, 12]


def test_random_batches_cover_rows_once_and_depend_on_epoch() -> None:
    rows = np.arange(10, 1010)
    sampler = GlobalBatchSampler(rows, batch_size=64, seed=0)
    batches = sampler.epoch_batches(0)
    assert all(len(b) == 64 for b in batches[:-1])
    flat = np.concatenate(batches)
    assert len(np.unique(flat)) == len(flat) and set(flat) <= set(rows)
    assert len(flat) == 1000 - 1000 % 64 + (1000 % 64 if 1000 % 64 >= 32 else 0)
    again = GlobalBatchSampler(rows, batch_size=64, seed=0).epoch_batches(0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not np.array_equal(batches[0], sampler.epoch_batches(1)[0])


def test_clustered_batches_are_whole_shuffled_clusters() -> None:
    rng = np.random.default_rng(0)
    rows = np.arange(1000)
    clusters = rng.permutation(np.repeat(np.arange(100), 10))  # 100 clusters of 10 queries
    sampler = GlobalBatchSampler(rows, batch_size=64, seed=7)
    sampler.set_clusters(clusters, 10)
    batches = sampler.epoch_batches(3)
    seen = np.concatenate(batches)
    assert np.array_equal(np.sort(seen), rows)  # the last batch (4 clusters = 40 >= 64 / 2) is kept
    assert [len(b) for b in batches] == [60] * 16 + [40]  # 6 whole clusters fit in 64
    for batch in batches:
        _, counts = np.unique(clusters[batch], return_counts=True)
        assert (counts == 10).all(), "every cluster in a batch is whole"
    # deterministic by (seed, epoch, clusters); a different epoch shuffles the clusters differently
    again = GlobalBatchSampler(rows, batch_size=64, seed=7)
    again.set_clusters(clusters, 10)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again.epoch_batches(3)))
    assert not np.array_equal(batches[0], sampler.epoch_batches(4)[0])


def test_clusters_bigger_than_a_batch_fill_batches_alone() -> None:
    rows = np.arange(300)
    clusters = np.repeat(np.arange(3), 100)
    sampler = GlobalBatchSampler(rows, batch_size=64, seed=0)
    sampler.set_clusters(clusters, 100)
    for batch in sampler.epoch_batches(0):
        assert len(np.unique(clusters[batch])) == 1 and len(batch) <= 64


def test_state_dict_round_trip_and_sibling_merge() -> None:
    rows = np.arange(64)
    sampler = GlobalBatchSampler(rows, batch_size=16, seed=1)
    sampler.set_clusters(np.arange(64) % 8, 8)
    restored = GlobalBatchSampler(rows, batch_size=16, seed=1)
    restored.load_state_dict(sampler.state_dict())
    assert all(np.array_equal(a, b) for a, b in zip(sampler.epoch_batches(2), restored.epoch_batches(2)))
    restored.merge_siblings(16)
    assert restored.cluster_size == 16 and set(restored.cluster_ids) == {0, 1, 2, 3}


@pytest.mark.parametrize("n,world", [(64, 1), (64, 2), (63, 4), (7, 3)])
def test_rank_shares_partition_the_global_batch(n: int, world: int) -> None:
    batch = np.random.default_rng(0).permutation(1000)[:n]
    bounds = slice_bounds(n, world)
    slices = [batch[bounds[r]: bounds[r + 1]] for r in range(world)]
    assert np.array_equal(np.concatenate(slices), batch)
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def _labels() -> sp.csr_matrix:
    dense = np.array([[1, 1, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]], dtype=np.float32)
    return sp.csr_matrix(dense)


def test_positive_sampling_uniform_and_propensity_weighted() -> None:
    labels = _labels()
    sampler = PositiveSampler(labels, seed=0)
    assert np.array_equal(sampler.rows_with_labels(), [0, 1, 3])
    draws = np.stack([sampler.sample(e) for e in range(3000)])
    assert (draws[:, 2] == -1).all()
    for row in (0, 1, 3):
        picked = np.unique(draws[:, row])
        assert set(picked) == set(labels[row].indices)
    assert np.array_equal(sampler.sample(5), PositiveSampler(labels, seed=0).sample(5))
    # label 4 weighs 9x label 1 for row 1
    weighted = PositiveSampler(labels, seed=0, inv_propensity=np.array([1, 1, 1, 1, 9.0]))
    share = np.mean(np.stack([weighted.sample(e) for e in range(3000)])[:, 1] == 4)
    assert 0.85 < share < 0.95


def test_batch_targets_mark_every_true_pair() -> None:
    labels = _labels()
    rows = np.array([0, 1, 3])
    sampled = np.array([0, 4, -1, 2])  # row 0 -> label 0, row 1 -> 4, row 3 -> 2
    t = batch_targets(labels, rows, sampled)
    assert t.label_ids.tolist() == [0, 2, 4]
    assert t.pos_index.tolist() == [0, 2, 1]
    # row 0 has labels {0, 1}: only 0 is in the batch; row 3 has {0, 2, 3}: 0 (sampled by row 0) is a true pair
    assert t.positive_mask.tolist() == [[True, False, False], [False, False, True], [True, True, False]]
    with pytest.raises(ValueError, match="without labels"):
        batch_targets(labels, np.array([2]), sampled)
