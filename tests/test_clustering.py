"""Balanced hierarchical 2-means: equal sizes, deterministic by seed, and it finds real structure."""

from __future__ import annotations

import numpy as np
import pytest

from vixml_ray.train.clustering import balanced_clusters, tree_depth


@pytest.mark.parametrize("n,size", [(1000, 16), (1003, 16), (777, 50), (5000, 1024), (20, 16), (3, 1)])
def test_clusters_are_balanced(n: int, size: int) -> None:
    x = np.random.default_rng(0).standard_normal((n, 12)).astype(np.float32)
    ids = balanced_clusters(x, size, seed=0)
    counts = np.bincount(ids)
    assert len(counts) == 2 ** tree_depth(n, size)
    assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert size / 2 <= counts.mean() <= size * 2 or n < 2 * size


def test_deterministic_by_seed_and_seed_matters() -> None:
    x = np.random.default_rng(1).standard_normal((4000, 16)).astype(np.float32)
    a = balanced_clusters(x, 32, seed=3)
    assert np.array_equal(a, balanced_clusters(x.copy(), 32, seed=3))
    assert not np.array_equal(a, balanced_clusters(x, 32, seed=4))


def test_big_node_path_equals_block_path() -> None:
    """Streaming a node in chunks (nodes bigger than a block) gives the same tree as processing it in one block."""
    x = np.random.default_rng(2).standard_normal((3000, 8)).astype(np.float32)
    whole = balanced_clusters(x, 100, seed=5)
    streamed = balanced_clusters(x, 100, seed=5, block_rows=256)
    assert np.array_equal(whole, streamed)


def test_recovers_separated_groups() -> None:
    """8 well-separated groups of 64 points -> clusters of 64 are exactly the groups."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((8, 32)).astype(np.float32) * 10
    truth = rng.permutation(np.repeat(np.arange(8), 64))
    x = centres[truth] + rng.standard_normal((len(truth), 32)).astype(np.float32)
    ids = balanced_clusters(x, 64, seed=0)
    pairs = set(zip(ids.tolist(), truth.tolist()))
    assert len(pairs) == 8  # every cluster is one group


def test_leaf_siblings_are_the_parent_split() -> None:
    """ids >> 1 is the clustering one level up (used to double the cluster size between refreshes)."""
    x = np.random.default_rng(4).standard_normal((2048, 8)).astype(np.float32)
    fine, coarse = balanced_clusters(x, 16, seed=9), balanced_clusters(x, 32, seed=9)
    assert np.array_equal(fine >> 1, coarse)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        balanced_clusters(np.zeros(10, np.float32), 4)
    with pytest.raises(ValueError, match="cluster_size"):
        balanced_clusters(np.zeros((10, 2), np.float32), 0)
