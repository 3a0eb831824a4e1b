"""Index versions on storage and the deterministic FAISS search/merge that makes sharding exact (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from vixml_ray import storage
from vixml_ray.config import IndexConfig
from vixml_ray.index import (
    VersionWriter,
    current_version,
    list_versions,
    read_manifest,
    read_rows,
    set_current,
    shard_bounds,
)
from vixml_ray.index.faiss_index import build_index, search_sorted
from vixml_ray.index.merge import merge_topk


def canonical_topk(queries: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in numpy: scores descending, ties by label id."""
    scores = queries @ labels.T
    order = np.lexsort((np.broadcast_to(np.arange(len(labels)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def write_version(index_dir: str, vectors: np.ndarray, parts: int = 3, identity: dict | None = None) -> str:
    writer = VersionWriter(index_dir)
    path = writer.new_version()
    rows = np.random.default_rng(0).permutation(len(vectors))  # shards hold arbitrary, unordered row subsets
    for shard_id, chunk in enumerate(np.array_split(rows, parts)):
        writer.write_shard(path, shard_id, chunk, vectors[chunk])
    return writer.commit(path, identity or {"model": "test"}).version


def test_write_commit_read_roundtrip(tmp_path):
    vectors = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    index_dir = str(tmp_path / "index")
    assert current_version(index_dir) is None
    assert write_version(index_dir, vectors, identity={"checkpoint": "ckpt-7"}) == "v1"
    manifest = read_manifest(index_dir)
    assert (manifest.num_labels, manifest.dim, manifest.identity) == (50, 8, {"checkpoint": "ckpt-7"})
    assert sum(f.num_rows for f in manifest.files) == 50
    assert storage.resolve(index_dir).endswith("versions/v1")  # the generic pointer reader agrees
    np.testing.assert_array_equal(read_rows(index_dir, manifest, 0, 50), vectors)
    np.testing.assert_array_equal(read_rows(index_dir, manifest, 17, 33), vectors[17:33])
    assert read_rows(index_dir, manifest, 5, 5).shape == (0, 8)

    assert write_version(index_dir, vectors[::-1].copy()) == "v2"
    assert current_version(index_dir) == "v2" and list_versions(index_dir) == ["v1", "v2"]
    set_current(index_dir, "v1")  # roll back
    np.testing.assert_array_equal(read_rows(index_dir, read_manifest(index_dir), 0, 3), vectors[:3])


def test_interrupted_write_leaves_current_version(tmp_path):
    index_dir = str(tmp_path / "index")
    vectors = np.ones((10, 4), dtype=np.float32)
    write_version(index_dir, vectors)
    writer = VersionWriter(index_dir)
    with pytest.raises(RuntimeError, match="worker died"):
        path = writer.new_version()
        writer.write_shard(path, 0, np.arange(5), vectors[:5])
        raise RuntimeError("worker died before commit")
    assert current_version(index_dir) == "v1"
    assert list_versions(index_dir) == ["v1"]
    with pytest.raises(FileNotFoundError, match="v2 .* not committed"):
        read_manifest(index_dir, "v2")
    assert writer.new_version().endswith("/v3")  # an abandoned name is never reused


def test_commit_checks_rows_and_immutability(tmp_path):
    writer = VersionWriter(str(tmp_path))
    vectors = np.zeros((6, 4), dtype=np.float32)
    path = writer.new_version()
    writer.write_shard(path, 0, np.arange(4), vectors[:4])
    writer.write_shard(path, 1, np.array([3, 5]), vectors[:2])
    with pytest.raises(ValueError, match=r"duplicated \[3\], missing \[4\]"):
        writer.commit(path)
    writer.write_shard(path, 1, np.array([4, 5]), vectors[:2])  # a retried shard overwrites
    writer.commit(path)
    with pytest.raises(FileExistsError, match="immutable"):
        writer.write_shard(path, 2, np.array([6]), vectors[:1])
    with pytest.raises(FileExistsError, match="immutable"):
        writer.commit(path)
    other = writer.new_version()
    writer.write_shard(other, 0, np.arange(2), np.zeros((2, 4), np.float32))
    writer.write_shard(other, 1, np.arange(2, 4), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="part-00001.parquet: dim 5"):
        writer.commit(other)
    with pytest.raises(ValueError, match="non-finite"):
        writer.write_shard(other, 2, np.arange(1), np.full((1, 4), np.nan, np.float32))


@pytest.mark.parametrize("num_shards", [1, 3, 7, 120])
def test_sharded_merge_equals_global_top_k_with_ties(num_shards):
    rng = np.random.default_rng(0)
    labels = rng.integers(-2, 3, size=(90, 4)).astype(np.float32)  # small integers: many exactly tied scores
    queries = rng.integers(-2, 3, size=(64, 4)).astype(np.float32)  # >= 20 queries: faiss's BLAS path
    k = 8
    parts = []
    for lo, hi in shard_bounds(len(labels), num_shards):
        scores, ids = search_sorted(build_index(labels[lo:hi], IndexConfig()), queries, k)
        parts.append((scores, np.where(ids >= 0, ids + lo, -1)))
    scores, ids = merge_topk(parts, k)
    ref_scores, ref_ids = canonical_topk(queries, labels, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)


def test_search_sorted_pads_when_index_is_small():
    labels = np.eye(3, dtype=np.float32)
    scores, ids = search_sorted(build_index(labels, IndexConfig()), np.ones((2, 3), np.float32), 5)
    np.testing.assert_array_equal(ids, [[0, 1, 2, -1, -1]] * 2)
    assert np.isneginf(scores[:, 3:]).all()
    empty = build_index(np.zeros((0, 3), np.float32), IndexConfig())
    assert (search_sorted(empty, np.ones((2, 3), np.float32), 4)[1] == -1).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_clustered_neighbours(kind):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16))
    labels = centres[rng.integers(0, 20, 4000)] + 0.3 * rng.standard_normal((4000, 16))
    labels = (labels / np.linalg.norm(labels, axis=1, keepdims=True)).astype(np.float32)
    queries = labels[:100] + 0.05
    cfg = IndexConfig(kind=kind, hnsw_ef_search=128, ivf_nlist=64, ivf_nprobe=16)
    index = build_index(labels, cfg)
    if kind == "ivf":
        assert index.nlist == 64 and index.nprobe == 16
    _, ids = search_sorted(index, queries, 10)
    _, exact = canonical_topk(queries, labels, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall > 0.9


def test_ivf_caps_lists_for_small_shards():
    labels = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    index = build_index(labels, IndexConfig(kind="ivf", ivf_nlist=1024, ivf_nprobe=32))
    assert index.nlist == 2 and index.nprobe == 2 and index.ntotal == 100
