"""Retrieval-augmented inference: the combined scores equal numpy brute force of the formula over all labels;
lam = 1 is plain label search; the training queries live in the index version (refresh writes and carries them,
the sharded index serves them through restarts and swaps); evaluate and the predictor apply it end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse as sp

from inference_helpers import inference_config, make_dataset, make_export, reference_embeddings
from vixml_ray.config import IndexConfig, RetrievalAugmentationConfig
from vixml_ray.data.dataset import open_dataset
from vixml_ray.errors import IncompatibleArtifactError
from vixml_ray.eval.evaluate import evaluate, read_predictions
from vixml_ray.index import QUERIES, ShardedIndex, VersionWriter, read_manifest, read_rows
from vixml_ray.index.raa import augmented_search, combine, vote_matrix
from vixml_ray.index.refresh import refresh_labels
from vixml_ray.index.tables import read_queries, train_label_matrix
from vixml_ray.inference.export import read_export
from vixml_ray.predict.predictor import Predictor, Query

CFG = IndexConfig(num_shards=2, cpus_per_shard=0.25, max_restarts=2, max_task_retries=3)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise top-k ids by (-score, id)."""
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((ids, -scores), axis=1)[:, :k]


def brute_force(queries: np.ndarray, labels: np.ndarray, train: np.ndarray, y: np.ndarray,
                raa: RetrievalAugmentationConfig, k: int, pairs: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The formula over every label in numpy (float64), filter pairs removed after combining: (ids, scores)."""
    s = (queries @ labels.T).astype(np.float64)
    sim = (queries @ train.T).astype(np.float64)
    neighbours = top_k(sim, raa.neighbors)
    logits = np.take_along_axis(sim, neighbours, axis=1) / raa.temperature
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    votes = np.einsum("qn,qnl->ql", weights, y[neighbours])
    score = raa.lam * s + (1 - raa.lam) * votes
    if pairs is not None and len(pairs):
        score[pairs[:, 0], pairs[:, 1]] = -np.inf
    ids = top_k(score, k)
    return ids, np.take_along_axis(score, ids, axis=1)


@pytest.fixture(scope="module")
def toy() -> dict:
    """200 labels, 150 training queries with 1-3 labels each, 25 test queries (>= 20: faiss's BLAS path)."""
    rng = np.random.default_rng(0)
    labels, train, queries = unit_rows(rng, 200, 16), unit_rows(rng, 150, 16), unit_rows(rng, 25, 16)
    y = np.zeros((150, 200))
    for row in range(150):
        y[row, rng.choice(200, size=rng.integers(1, 4), replace=False)] = 1.0
    return {"labels": labels, "train": train, "queries": queries, "y": y}


def numpy_combine(toy: dict, raa: RetrievalAugmentationConfig, label_k: int, k: int
                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The module's combination from numpy label and neighbour top lists; also the pairs it asked scores for."""
    s = toy["queries"] @ toy["labels"].T
    sim = toy["queries"] @ toy["train"].T
    label_ids, neighbour_ids = top_k(s, label_k), top_k(sim, raa.neighbors)
    votes = vote_matrix(neighbour_ids, np.take_along_axis(sim, neighbour_ids, axis=1),
                        sp.csr_matrix(toy["y"]), raa.temperature)
    asked: list[np.ndarray] = []

    def exact(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        asked.append(np.stack([rows, ids], axis=1))
        return s[rows, ids]

    ids, scores = combine(label_ids, np.take_along_axis(s, label_ids, axis=1), votes, exact, raa.lam, k)
    return ids, scores, asked


def test_combine_equals_brute_force_of_the_formula(toy):
    raa = RetrievalAugmentationConfig(enabled=True, lam=0.5, temperature=0.05, neighbors=10)
    ids, scores, asked = numpy_combine(toy, raa, label_k=15, k=12)
    expected, expected_scores = brute_force(toy["queries"], toy["labels"], toy["train"], toy["y"], raa, 12)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
    label_top = top_k(toy["queries"] @ toy["labels"].T, 15)
    promoted = sum(len(np.setdiff1d(ids[q], label_top[q])) for q in range(len(ids)))
    assert promoted > 0  # voted labels from outside the label top-K made it: the exact-score path matters
    pairs = np.concatenate(asked)
    assert not any(pairs[i, 1] in label_top[pairs[i, 0]] for i in range(len(pairs)))  # only outside labels asked


def test_lam_one_is_plain_label_search(toy):
    raa = RetrievalAugmentationConfig(enabled=True, lam=1.0, temperature=0.05, neighbors=10)
    ids, scores, _ = numpy_combine(toy, raa, label_k=15, k=15)
    s = toy["queries"] @ toy["labels"].T
    plain = top_k(s, 15)
    np.testing.assert_array_equal(ids, plain)
    np.testing.assert_array_equal(scores, np.take_along_axis(s, plain, axis=1))


def write_raa_version(index_dir: str, labels: np.ndarray, train: np.ndarray) -> str:
    writer = VersionWriter(index_dir)
    path = writer.new_version()
    for shard, rows in enumerate(np.array_split(np.random.default_rng(1).permutation(len(labels)), 3)):
        writer.write_shard(path, shard, rows, labels[rows])
    for shard, rows in enumerate(np.array_split(np.arange(len(train)), 2)):
        writer.write_shard(path, shard, rows, train[rows], part=QUERIES)
    return writer.commit(path).version


def test_sharded_augmented_search_is_exact_through_restart_and_swap(ray_session, tmp_path, toy):
    index_dir = str(tmp_path / "index")
    write_raa_version(index_dir, toy["labels"], toy["train"])
    manifest = read_manifest(index_dir)
    assert (manifest.num_labels, manifest.num_rows(QUERIES), manifest.dim) == (200, 150, 16)
    np.testing.assert_array_equal(read_rows(index_dir, manifest, 40, 90, QUERIES), toy["train"][40:90])
    raa = RetrievalAugmentationConfig(enabled=True, lam=0.6, temperature=0.05, neighbors=10)
    y, queries = sp.csr_matrix(toy["y"]), toy["queries"]
    plain = top_k(queries @ toy["labels"].T, 3)
    exclude = np.array([[0, plain[0, 0]], [0, plain[0, 1]], [3, plain[3, 2]], [7, 5]])

    with ShardedIndex(index_dir, CFG, parts=("labels", QUERIES)) as index:
        with index.pinned() as view:
            result = augmented_search(view, queries, 12, raa, y, exclude)
            lam_one = augmented_search(view, queries, 12, dataclasses.replace(raa, lam=1.0), y, exclude)
        reference = index.search(queries, 12, exclude)
        ray_session.kill(index.actors[1], no_restart=False)  # the restarted shard reloads both parts
        with index.pinned() as view:
            after_restart = augmented_search(view, queries, 12, raa, y, exclude)
        write_raa_version(index_dir, toy["labels"][::-1].copy(), toy["train"][::-1].copy())
        assert index.swap() == "v2"
        with index.pinned() as view:
            swapped = augmented_search(view, queries, 12, raa, sp.csr_matrix(toy["y"][::-1, ::-1]))

    expected, expected_scores = brute_force(queries, toy["labels"], toy["train"], toy["y"], raa, 12, exclude)
    np.testing.assert_array_equal(result.ids, expected)
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-5)
    assert not np.array_equal(result.ids, reference.ids)  # the votes change the ranking
    np.testing.assert_array_equal(lam_one.ids, reference.ids)  # lam = 1: plain search, exclusions included
    np.testing.assert_array_equal(lam_one.scores, reference.scores)
    np.testing.assert_array_equal(after_restart.ids, result.ids)
    flipped = brute_force(queries, toy["labels"][::-1], toy["train"][::-1], toy["y"][::-1, ::-1], raa, 12)[0]
    assert (result.version, swapped.version) == ("v1", "v2")
    np.testing.assert_array_equal(swapped.ids, flipped)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """A text-only tiny export (so the predictor's raw queries embed as the evaluation's do), its dataset and an
    index refreshed with the training queries."""
    tmp = tmp_path_factory.mktemp("raa")
    cfg = inference_config(tmp, "model.use_images=false", "infer.raa.enabled=true", "infer.raa.lam=0.5",
                           "infer.raa.neighbors=8")
    dataset = make_dataset(tmp / "ds", cfg)
    export = make_export(tmp / "export", cfg)
    index = str(tmp / "index")
    summary = refresh_labels(export, dataset, index, cfg)
    return {"tmp": tmp, "cfg": cfg, "dataset": dataset, "export": export, "index": index, "summary": summary}


def test_refresh_writes_and_carries_the_training_queries(trained):
    index, ds = trained["index"], open_dataset(trained["dataset"])
    manifest = read_manifest(index, "v1")
    assert trained["summary"]["queries"]["rows"] == manifest.num_rows(QUERIES) == ds.num_train == 60
    assert all(f.num_rows <= trained["cfg"].infer.rows_per_part for f in manifest.queries.files)
    np.testing.assert_allclose(read_rows(index, manifest, 0, 60, QUERIES),
                               reference_embeddings(trained["export"], trained["dataset"], "train"), atol=1e-5)
    assert read_queries(index, "v1", ["labels"]).column("labels").to_pylist() == ds.table(
        "train", ["labels"]).column("labels").to_pylist()
    assert (train_label_matrix(index, manifest) != (ds.label_matrix("train") > 0)).nnz == 0

    summary = refresh_labels(trained["export"], trained["dataset"], index, trained["cfg"], incremental=True)
    v2 = read_manifest(index, "v2")
    assert (summary["queries"]["embedded"], summary["queries"]["carried"]) == (0, 60)
    np.testing.assert_array_equal(read_rows(index, v2, 0, 60, QUERIES), read_rows(index, manifest, 0, 60, QUERIES))
    assert set(read_queries(index, "v2", ["source_version"]).column("source_version").to_pylist()) == {"v1"}


@pytest.mark.slow
def test_evaluate_and_predictor_apply_raa(trained):
    cfg, index, export, dataset = trained["cfg"], trained["index"], trained["export"], trained["dataset"]
    out = trained["tmp"] / "eval-raa"
    summary = evaluate(export, dataset, str(out), index_dir=index, cfg=cfg)
    manifest = read_manifest(index)
    labels = read_rows(index, manifest, 0, manifest.num_labels)
    train = read_rows(index, manifest, 0, manifest.num_rows(QUERIES), QUERIES)
    queries = reference_embeddings(export, dataset, "test")
    y = train_label_matrix(index, manifest).toarray()
    ds = open_dataset(dataset)
    assert len(ds.filter_pairs()) == 0  # so the predictor's top-k (no filters online) is the evaluation's
    expected, _ = brute_force(queries, labels, train, y, cfg.infer.raa, cfg.eval.topk, ds.filter_pairs())
    _, predicted, scores = read_predictions(str(out))
    np.testing.assert_array_equal(np.stack(predicted), expected)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["raa"] == {"enabled": True, "lam": 0.5, "temperature": 0.05, "neighbors": 8} and summary["raa"]
    assert "retrieval-augmented (lam 0.5" in (out / "metrics.md").read_text()

    with Predictor(export, index, cfg) as predictor:
        online = predictor.predict([Query(text) for text in ds.texts("test")], cfg.eval.topk)
    assert [p.ids for p in online] == [p.tolist() for p in predicted]
    np.testing.assert_allclose([p.scores for p in online], np.stack(scores), atol=1e-5)


def test_raa_needs_the_training_queries_in_the_index(trained):
    plain_index = str(trained["tmp"] / "plain-index")
    writer = VersionWriter(plain_index)
    path = writer.new_version()
    dim = read_export(trained["export"]).hidden_size
    writer.write_shard(path, 0, np.arange(30), np.eye(30, dim, dtype=np.float32))
    writer.commit(path, {"export": read_export(trained["export"]).identity()})
    with pytest.raises(IncompatibleArtifactError, match=rf"'infer.raa.enabled'.*v1 of {plain_index}"):
        evaluate(trained["export"], trained["dataset"], str(trained["tmp"] / "eval-x"), index_dir=plain_index,
                 cfg=trained["cfg"])
    with pytest.raises(IncompatibleArtifactError, match="'infer.raa.enabled'"):
        Predictor(trained["export"], plain_index, trained["cfg"])
