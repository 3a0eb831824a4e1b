"""The sharded index on Ray actors: exact top-k, exclusions, shard restarts, version swaps under load."""

from __future__ import annotations

import dataclasses
import os
import threading

import faiss
import numpy as np
import pytest

from vixml_ray.config import IndexConfig
from vixml_ray.index import ShardedIndex, VersionWriter, current_version

from test_index_versions import canonical_topk, write_version

CFG = IndexConfig(cpus_per_shard=0.25, max_restarts=2, max_task_retries=3)  # 5 shards fit in 2 CPUs


@pytest.fixture(scope="module")
def tie_labels() -> np.ndarray:
    return np.random.default_rng(0).integers(-2, 3, size=(40, 4)).astype(np.float32)  # many exact ties


@pytest.fixture(scope="module")
def tie_index(tmp_path_factory, tie_labels) -> str:
    index_dir = str(tmp_path_factory.mktemp("ties") / "index")
    write_version(index_dir, tie_labels)
    return index_dir


@pytest.mark.parametrize("num_shards, num_labels", [(1, 40), (3, 40), (5, 3)])  # 5 shards > 3 labels: 2 empty
def test_sharded_top_k_equals_global_exact(ray_session, tmp_path, tie_labels, num_shards, num_labels):
    labels = tie_labels[:num_labels]
    index_dir = str(tmp_path / "index")
    write_version(index_dir, labels, parts=2)
    queries = np.random.default_rng(1).integers(-2, 3, size=(32, 4)).astype(np.float32)  # >= 20: faiss BLAS path
    with ShardedIndex(index_dir, dataclasses.replace(CFG, num_shards=num_shards)) as index:
        result = index.search(queries, 10)
        sizes = [s["ntotal"] for s in index.info()]
    assert len(sizes) == num_shards and sum(sizes) == num_labels
    ref_scores, ref_ids = canonical_topk(queries, labels, 10)
    width = ref_ids.shape[1]  # fewer labels than k: the rest is padding
    np.testing.assert_array_equal(result.ids[:, :width], ref_ids)
    np.testing.assert_array_equal(result.scores[:, :width], ref_scores)
    assert (result.ids[:, width:] == -1).all() and np.isneginf(result.scores[:, width:]).all()
    assert result.version == "v1"


def test_sharded_equals_one_faiss_index_and_excludes_pairs(ray_session, tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((25, 16)).astype(np.float32)
    index_dir = str(tmp_path / "index")
    write_version(index_dir, labels)
    single = faiss.IndexFlatIP(16)
    single.add(labels)
    ref_scores, ref_ids = single.search(queries, 20)
    exclude = np.array([[0, ref_ids[0, 0]], [0, ref_ids[0, 3]], [0, 7], [4, ref_ids[4, 19]], [4, ref_ids[4, 19]]])
    with ShardedIndex(index_dir, dataclasses.replace(CFG, num_shards=3)) as index:
        result = index.search(queries, 20)
        filtered = index.search(queries, 20, exclude=exclude)
        with pytest.raises(ValueError, match=r"queries must be \(n, 16\)"):
            index.search(queries[:, :8], 5)
        with pytest.raises(ValueError, match="exclude rows"):
            index.search(queries, 5, exclude=np.array([[25, 0]]))
    np.testing.assert_array_equal(result.ids, ref_ids)
    np.testing.assert_allclose(result.scores, ref_scores, atol=1e-5)
    banned = set(map(tuple, exclude.tolist()))
    for row in range(len(queries)):  # the top 20 of the labels left after exclusion, in order
        kept = [label for label in canonical_topk(queries[row:row + 1], labels, 40)[1][0]
                if (row, label) not in banned][:20]
        np.testing.assert_array_equal(filtered.ids[row], kept)


def test_killed_shard_restarts_and_answers_in_full(ray_session, tie_index, tie_labels):
    queries = np.random.default_rng(3).integers(-2, 3, size=(8, 4)).astype(np.float32)
    with ShardedIndex(tie_index, dataclasses.replace(CFG, num_shards=2)) as index:
        before = index.info()[1]["pid"]
        ray_session.kill(index.actors[1], no_restart=False)
        result = index.search(queries, 40)  # the whole label set: every shard must contribute
        assert index.info()[1]["pid"] != before
    np.testing.assert_array_equal(result.ids, canonical_topk(queries, tie_labels, 40)[1])


def test_swap_under_load_never_fails_or_mixes_versions(ray_session, tmp_path):
    index_dir = str(tmp_path / "index")
    rng = np.random.default_rng(4)
    v1, v2 = rng.standard_normal((2, 60, 8)).astype(np.float32)
    write_version(index_dir, v1)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    expected = {"v1": canonical_topk(queries, v1, 5)[1], "v2": canonical_topk(queries, v2, 5)[1]}
    seen, errors, stop = [], [], threading.Event()

    def query_loop(index: ShardedIndex) -> None:
        while not stop.is_set():
            try:
                result = index.search(queries, 5)
                seen.append(result.version)
                if not np.array_equal(result.ids, expected[result.version]):
                    errors.append(f"{result.version} answered with other ids")
            except Exception as err:  # any failure is a test failure
                errors.append(repr(err))

    with ShardedIndex(index_dir, dataclasses.replace(CFG, num_shards=2)) as index:
        worker = threading.Thread(target=query_loop, args=(index,))
        worker.start()
        try:
            assert write_version(index_dir, v2) == "v2"
            assert index.version == "v1"  # committing does not touch a running index
            assert index.swap() == "v2"
            while seen.count("v2") < 3:
                stop.wait(0.05)
        finally:
            stop.set()
            worker.join()
    assert not errors, errors[:3]
    assert "v1" in seen and seen[seen.index("v2"):].count("v1") == 0  # switched once, never back


def test_interrupted_write_or_failed_load_keeps_serving_old_version(ray_session, tmp_path):
    index_dir = str(tmp_path / "index")
    labels = np.eye(4, dtype=np.float32)
    write_version(index_dir, labels)
    writer = VersionWriter(index_dir)
    path = writer.new_version()
    writer.write_shard(path, 0, np.arange(2), labels[:2])  # the job dies here, before commit
    with ShardedIndex(index_dir, dataclasses.replace(CFG, num_shards=1)) as index:
        assert index.swap() == "v1" and current_version(index_dir) == "v1"
        with pytest.raises(FileNotFoundError, match="not committed"):
            index.swap("v2")
        # a committed version whose shard file is gone: its shard fails to load, the swap fails, v1 serves on
        path = writer.new_version()
        writer.write_shard(path, 0, np.arange(4), labels)
        broken = writer.commit(path, make_current=False).version
        os.remove(os.path.join(path, "part-00000.parquet"))
        with pytest.raises(ray_session.exceptions.RayActorError, match="part-00000.parquet"):
            index.swap(broken)
        result = index.search(labels, 1)
    assert result.version == "v1"
    np.testing.assert_array_equal(result.ids[:, 0], [0, 1, 2, 3])
