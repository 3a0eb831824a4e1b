"""Balanced hierarchical 2-means: split query embeddings into equal-sized clusters of about ``c`` rows (NGAME).

Every node of the tree is split into two halves by 2-means with a *balanced* assignment: each point is scored by how
much closer it is to the first centre than to the second (``x . (c0 - c1) - (|c0|^2 - |c1|^2) / 2``), the node's points
are sorted by that score and cut at the median. A few such iterations per split, then the same for the children, down
to ``2^depth`` leaves whose sizes differ by at most one.

The tree is kept as one permutation ``order`` of the rows in which every node is a contiguous range: node ``j`` of a
level with ``k`` nodes covers positions ``[j*n//k, (j+1)*n//k)``, so a split only reorders positions inside its range.
All nodes of a level are processed together: small nodes in blocks (gathered once per level into a padded
``[nodes, size, dim]`` array, then every iteration is one batched matrix-vector product and one row-wise sort); the
few nodes of the top levels, bigger than a block, by contiguous scans of the rows in their stored order (scoring a
block against all nodes' centres at once), so no level gathers rows at random more than once. Cost per level is
O(n * dim * iters) (times the node count, at most ``n / block_rows``, on the top levels); no O(n^2) anywhere.
Deterministic for a given seed.
"""

from __future__ import annotations

import math

import numpy as np


def tree_depth(n: int, cluster_size: int) -> int:
    """Number of binary splits that brings ``n`` rows closest (in log scale) to clusters of ``cluster_size``."""
    if cluster_size < 1:
        raise ValueError(f"cluster_size must be >= 1, got {cluster_size}")
    if n < 2 * cluster_size:
        return 0
    return max(0, min(int(round(math.log2(n / cluster_size))), int(math.log2(n))))


def balanced_clusters(
    x: np.ndarray, cluster_size: int, seed: int = 0, iters: int = 3, block_rows: int = 1 << 18,
    depth: int | None = None,
) -> np.ndarray:
    """Cluster id (``int64 [n]``, ``0..2^depth-1``) of every row of ``x`` (``[n, dim]`` float32).

    All clusters have ``n // 2^depth`` or that plus one rows, where ``depth = tree_depth(n, cluster_size)`` unless
    given (at most log2(n)).
    ``block_rows`` bounds the rows gathered at once (memory: about ``block_rows * dim * 8`` bytes).
    """
    if x.ndim != 2:
        raise ValueError(f"expected a [n, dim] array, got shape {x.shape}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if depth is None:
        depth = tree_depth(n, cluster_size)
    elif not 0 <= depth <= max(0, int(math.log2(max(n, 1)))):
        raise ValueError(f"depth {depth} needs 0 <= depth <= log2(n) = {math.log2(max(n, 1)):.2f}")
    rng = np.random.default_rng(seed)
    order = np.arange(n, dtype=np.int64)
    for level in range(depth):
        k = 1 << level
        bounds = np.arange(k + 1, dtype=np.int64) * n // k
        mids = (2 * np.arange(k, dtype=np.int64) + 1) * n // (2 * k)
        first, second = _initial_pair(np.diff(bounds), rng)  # offsets of each node's two initial centres
        if n // k + 1 > block_rows:
            _split_big_nodes(x, order, bounds, mids, (first, second), iters, block_rows)
        else:
            per_block = max(1, block_rows // (n // k + 1))
            for j0 in range(0, k, per_block):
                j1 = min(k, j0 + per_block)
                _split_small_nodes(x, order, bounds[j0 : j1 + 1], mids[j0:j1], (first[j0:j1], second[j0:j1]), iters)
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.repeat(np.arange(1 << depth, dtype=np.int64), cluster_sizes(n, cluster_size, depth))
    return ids


def cluster_sizes(n: int, cluster_size: int, depth: int | None = None) -> np.ndarray:
    """Rows of each cluster id of :func:`balanced_clusters` for ``n`` rows: fixed by ``n`` and the depth alone
    (default ``tree_depth(n, cluster_size)``)."""
    leaves = 1 << (tree_depth(n, cluster_size) if depth is None else depth)
    return np.diff(np.arange(leaves + 1, dtype=np.int64) * n // leaves)


def _initial_pair(sizes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct random offsets inside each node (the initial centres)."""
    a = (rng.random(len(sizes)) * sizes).astype(np.int64)
    b = (a + 1 + (rng.random(len(sizes)) * (sizes - 1)).astype(np.int64)) % sizes
    return a, b


def _split_small_nodes(
    x: np.ndarray,
    order: np.ndarray,
    bounds: np.ndarray,
    mids: np.ndarray,
    init: tuple[np.ndarray, np.ndarray],
    iters: int,
) -> None:
    """Splits the nodes ``[bounds[i], bounds[i+1])`` at ``mids[i]`` together, reordering ``order`` in place."""
    starts, sizes = bounds[:-1], np.diff(bounds)
    width = int(sizes.max())
    offsets = np.arange(width, dtype=np.int64)
    valid = offsets[None, :] < sizes[:, None]
    positions = np.where(valid, starts[:, None] + offsets[None, :], starts[:, None])
    rows = order[positions]
    block = x[rows]  # [nodes, width, dim]; padded slots repeat the node's first row and are masked
    n_left = (mids - starts).astype(np.float32)
    n_right = sizes.astype(np.float32) - n_left
    total = np.einsum("nw,nwd->nd", valid.astype(np.float32), block)
    node = np.arange(len(sizes))
    c0, c1 = block[node, init[0]], block[node, init[1]]
    for it in range(iters):
        w = c0 - c1
        bias = 0.5 * (np.einsum("nd,nd->n", c0, c0) - np.einsum("nd,nd->n", c1, c1))
        score = np.einsum("nwd,nd->nw", block, w) - bias[:, None]
        score[~valid] = -np.inf
        ranked = np.argsort(-score, axis=1, kind="stable")  # closest to c0 first; padding last
        if it == iters - 1:
            break
        left = np.zeros_like(valid)
        np.put_along_axis(left, ranked, offsets[None, :] < (mids - starts)[:, None], axis=1)
        left_sum = np.einsum("nw,nwd->nd", left.astype(np.float32), block)
        c0 = left_sum / n_left[:, None]
        c1 = (total - left_sum) / n_right[:, None]
    new_rows = np.take_along_axis(rows, ranked, axis=1)
    order[positions[valid]] = new_rows[valid]


def _split_big_nodes(
    x: np.ndarray,
    order: np.ndarray,
    bounds: np.ndarray,
    mids: np.ndarray,
    init: tuple[np.ndarray, np.ndarray],
    iters: int,
    block_rows: int,
) -> None:
    """Splits the few big nodes of a top level by contiguous scans of ``x`` in row order (no random gathers of
    rows): each scan block is scored against every node's centre pair with one small matrix product."""
    k = len(bounds) - 1
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    node = np.searchsorted(bounds, position, side="right") - 1  # node of each row
    starts = bounds[:-1]
    c0, c1 = x[order[starts + init[0]]], x[order[starts + init[1]]]
    n_left = (mids - starts).astype(np.float64)
    n_right = np.diff(bounds).astype(np.float64) - n_left
    total = _node_sums(x, node, np.ones(len(order), dtype=bool), k, block_rows)
    score = np.empty(len(order), dtype=np.float32)
    for it in range(iters):
        w = c0 - c1
        bias = 0.5 * (np.einsum("nd,nd->n", c0, c0) - np.einsum("nd,nd->n", c1, c1))
        for lo in range(0, len(order), block_rows):
            part = node[lo : lo + block_rows]
            projected = x[lo : lo + block_rows] @ w.T  # [block, k]
            score[lo : lo + block_rows] = projected[np.arange(len(part)), part] - bias[part]
        ranked = [np.argsort(-score[order[a:b]], kind="stable") for a, b in zip(bounds[:-1], bounds[1:])]
        if it == iters - 1:
            break
        left = np.zeros(len(order), dtype=bool)
        for a, m, r in zip(bounds[:-1], mids, ranked):
            left[order[a + r[: m - a]]] = True
        left_sum = _node_sums(x, node, left, k, block_rows)
        c0 = (left_sum / n_left[:, None]).astype(np.float32)
        c1 = ((total - left_sum) / n_right[:, None]).astype(np.float32)
    for a, b, r in zip(bounds[:-1], bounds[1:], ranked):
        order[a:b] = order[a:b][r]


def _node_sums(x: np.ndarray, node: np.ndarray, keep: np.ndarray, k: int, block_rows: int) -> np.ndarray:
    """float64 [k, dim]: per node, the sum of its rows where ``keep`` (one-hot matrix products over row blocks)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    for lo in range(0, len(node), block_rows):
        part = node[lo : lo + block_rows]
        onehot = np.zeros((k, len(part)), dtype=np.float32)
        onehot[part, np.arange(len(part))] = keep[lo : lo + block_rows]
        sums += onehot @ x[lo : lo + block_rows]
    return sums


