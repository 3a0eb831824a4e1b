"""The sparse lexical head (``model.lexical``): it separates a label's queries from the ones the dense model confuses
with it, round-trips through its files, re-ranks the index's candidates exactly as numpy does (with and without
retrieval augmentation), and a trained model carries it through the export into evaluate and the predictor."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from vixml_ray.config import IndexConfig, LexicalConfig, RetrievalAugmentationConfig, load_config
from vixml_ray.errors import IncompatibleArtifactError
from vixml_ray.index import QUERIES, ShardedIndex, VersionWriter
from vixml_ray.index.raa import LexicalTerm, augmented_search
from vixml_ray.model.lexical import VOCABULARY_FILE, load_lexical
from vixml_ray.train.lexical import fit_lexical

CFG = LexicalConfig(enabled=True, weight=0.5, candidates=6, negatives=3, random_negatives=0, min_queries=2)
TEXTS = ["red apple pie", "apple pie recipe", "green apple tart", "pear tart recipe", "pear cake",
         "chocolate cake recipe", "dark chocolate cake", "chocolate pie", "lone label text"]
# label 0: apple, 1: pear, 2: chocolate, 3: cake, 4: a label with one query (no classifier), 5: no query at all
LABELS = [[0], [0], [0], [1], [1, 3], [2, 3], [2, 3], [2], [4]]


def _labels() -> sp.csr_matrix:
    rows = [r for r, ls in enumerate(LABELS) for _ in ls]
    return sp.csr_matrix((np.ones(len(rows)), (rows, [l for ls in LABELS for l in ls])), shape=(len(LABELS), 6))


def _shortlist() -> np.ndarray:
    """Every query's top 3 labels as a dense model might have them: its own and the ones it is confused with."""
    return np.array([[0, 1, -1], [0, 2, 1], [0, 1, -1], [1, 0, 3], [1, 3, 0], [2, 3, 0], [3, 2, -1], [2, 0, 1],
                     [4, 0, -1]])


def test_the_head_separates_a_label_from_the_queries_confused_with_it() -> None:
    head = fit_lexical(CFG, TEXTS, _labels(), _shortlist(), seed=0)
    assert head.num_labels == 6
    assert head.trained.tolist() == [True, True, True, True, False, False]  # 4: one query; 5: none
    features = head.features(TEXTS)
    y, short = _labels().toarray(), _shortlist()
    for label in range(4):  # on its training queries: its queries above 0, the ones confused with it below
        h = head.pair_scores(features, np.arange(len(TEXTS)), np.full(len(TEXTS), label))
        confused = np.isin(np.arange(len(TEXTS)), np.flatnonzero((short == label).any(axis=1))) & (y[:, label] == 0)
        assert (h[y[:, label] > 0] > 0).all() and (h[confused] < 0).all(), label
    unseen = head.features(["", "unknown words"])
    for label in (4, 5):  # no classifier: -1 everywhere
        np.testing.assert_array_equal(head.pair_scores(features, np.arange(len(TEXTS)), np.full(len(TEXTS), label)), -1)
    np.testing.assert_allclose(head.pair_scores(unseen, [0, 1], [0, 0]), head.bias[0])  # no known n-gram: the bias
    assert head.weights[0].nnz < len(head.vectorizer.vocabulary_)  # sparse: only its training queries' n-grams


def test_random_negatives_teach_a_label_the_queries_nobody_confused_with_it() -> None:
    """With every query's shortlist its own labels only, there is no hard negative and no classifier; uniformly drawn
    training queries (64 draws over 9 queries: all of them) make each label reject every query not its own."""
    own = np.array([[ls[0], -1, -1] for ls in LABELS])
    assert not fit_lexical(CFG, TEXTS, _labels(), own, seed=0).trained.any()
    cfg = replace(CFG, random_negatives=64)
    head = fit_lexical(cfg, TEXTS, _labels(), own, seed=0)
    assert head.trained.tolist() == [True, True, True, True, False, False]
    y, features = _labels().toarray(), head.features(TEXTS)
    for label in range(4):
        h = head.pair_scores(features, np.arange(len(TEXTS)), np.full(len(TEXTS), label))
        assert (h[y[:, label] > 0] > 0).all() and (h[y[:, label] == 0] < 0).all(), label
    again = fit_lexical(cfg, TEXTS, _labels(), own, seed=0)
    assert (again.weights != head.weights).nnz == 0 and np.array_equal(again.bias, head.bias)


def test_pair_scores_of_a_popular_label_never_copy_its_row() -> None:
    """A popular label's classifier spans most n-grams; scoring 45,000 pairs of it must look up each query's few
    n-grams, not copy its 50,000-weight row per pair (2.25e9 entries overflow scipy's int32 row indexing, as
    evaluating cooking did). Scores equal the dense product."""
    from vixml_ray.model.lexical import LexicalHead

    num_features, pairs = 50_000, 50_000
    dense = np.zeros((2, num_features), dtype=np.float32)
    dense[0] = np.random.default_rng(0).normal(size=num_features)
    dense[1, 7] = 0.5
    weights = sp.csr_matrix(dense)
    head = LexicalHead(CFG, {f"t{i}": i for i in range(num_features)}, np.ones(num_features), weights,
                       np.array([0.25, -0.5]), np.array([True, True]))
    features = head.features(["t1 t7 t49999", "t7", "nothing known"])
    rows, labels = np.arange(pairs) % 3, (np.arange(pairs) % 10 == 0).astype(np.int64)  # 45,000 pairs of label 0
    expected = (features @ weights.T).toarray()[rows, labels] + head.bias[labels]
    np.testing.assert_allclose(head.pair_scores(features, rows, labels), expected, rtol=1e-6, atol=1e-7)


def test_the_head_round_trips_through_its_files(tmp_path: Path) -> None:
    head = fit_lexical(CFG, TEXTS, _labels(), _shortlist(), seed=0)
    head.save(str(tmp_path))
    loaded = load_lexical(str(tmp_path), CFG)
    features = head.features(TEXTS + ["apple cake"])
    pairs = np.array([[r, l] for r in range(len(TEXTS) + 1) for l in range(6)])
    np.testing.assert_allclose(loaded.pair_scores(loaded.features(TEXTS + ["apple cake"]), pairs[:, 0], pairs[:, 1]),
                               head.pair_scores(features, pairs[:, 0], pairs[:, 1]), rtol=1e-6)
    with pytest.raises(IncompatibleArtifactError, match="ngram_max"):
        load_lexical(str(tmp_path), LexicalConfig(enabled=True, ngram_max=1))
    (tmp_path / VOCABULARY_FILE).unlink()
    with pytest.raises(IncompatibleArtifactError, match="no lexical head was saved"):
        load_lexical(str(tmp_path), CFG)


def test_training_queries_and_labels_must_agree() -> None:
    with pytest.raises(ValueError, match="9 texts, 9 label rows and 2 shortlists"):
        fit_lexical(CFG, TEXTS, _labels(), _shortlist()[:2], seed=0)


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _numpy_rerank(s: np.ndarray, votes: np.ndarray, h: np.ndarray, lam: float, weight: float, depth: int,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """The formula over each query's candidates (dense top ``depth`` by (-s, id), plus voted labels), in numpy."""
    ids = np.broadcast_to(np.arange(s.shape[1]), s.shape)
    dense_top = np.lexsort((ids, -s), axis=1)[:, :depth]
    score = np.full(s.shape, -np.inf)
    for q in range(len(s)):
        candidates = np.union1d(dense_top[q], np.flatnonzero(votes[q] > 0))
        score[q, candidates] = lam * s[q, candidates] + (1 - lam) * votes[q, candidates] + weight * h[q, candidates]
    top = np.lexsort((ids, -score), axis=1)[:, :k]
    return top, np.take_along_axis(score, top, axis=1)


@pytest.mark.parametrize("with_raa", [False, True])
def test_sharded_search_with_the_head_equals_numpy_over_the_candidates(ray_session: object, tmp_path: Path,
                                                                         with_raa: bool) -> None:
    rng = np.random.default_rng(3)
    num_labels, dim = 6, 8
    labels, train, queries = _unit(rng, num_labels, dim), _unit(rng, len(TEXTS), dim), _unit(rng, 4, dim)
    query_texts = ["apple pie", "pear cake recipe", "chocolate tart", "lone label"]
    writer = VersionWriter(str(tmp_path / "index"))
    path = writer.new_version()
    writer.write_shard(path, 0, np.arange(3), labels[:3])
    writer.write_shard(path, 1, np.arange(3, 6), labels[3:])
    writer.write_shard(path, 0, np.arange(len(train)), train, part=QUERIES)
    writer.commit(path)
    head = fit_lexical(CFG, TEXTS, _labels(), _shortlist(), seed=0)
    raa = RetrievalAugmentationConfig(enabled=with_raa, lam=0.7, temperature=0.1, neighbors=3)
    term = LexicalTerm.of(head, query_texts)
    assert term.weight == CFG.weight and term.candidates == CFG.candidates
    term.candidates = 3  # fewer than the labels (and more than k): the candidate set matters
    y = _labels()
    with ShardedIndex(str(tmp_path / "index"), IndexConfig(), parts=("labels", QUERIES)) as index:
        with index.pinned() as view:
            got = augmented_search(view, queries, 2, raa, y if with_raa else None, lexical=term)

    s = (queries @ labels.T).astype(np.float64)
    votes = np.zeros_like(s)
    if with_raa:
        sim = (queries @ train.T).astype(np.float64)
        near = np.argsort(-sim, axis=1, kind="stable")[:, :3]
        logits = np.take_along_axis(sim, near, axis=1) / raa.temperature
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        votes = np.einsum("qn,qnl->ql", w, y.toarray()[near])
    features = head.features(query_texts)
    h = np.stack([head.pair_scores(features, np.full(num_labels, q), np.arange(num_labels)) for q in range(4)])
    want_ids, want_scores = _numpy_rerank(s, votes, h, raa.lam if with_raa else 1.0, CFG.weight, 3, 2)
    valid = np.isfinite(want_scores)
    np.testing.assert_array_equal(got.ids[valid], want_ids[valid])
    assert (got.ids[~valid] == -1).all()
    np.testing.assert_allclose(got.scores[valid], want_scores[valid], atol=1e-5)
    assert not np.array_equal(want_ids[:, :2], np.argsort(-s, axis=1, kind="stable")[:, :2])  # the head re-ranked



# ------------------------------------------------------------------------------------ trained model end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    from inference_helpers import make_dataset
    from vixml_ray.train import train

    root = tmp_path_factory.mktemp("lexical")
    overrides = {
        "cache_dir": str(root / "cache"), "data.validation_fraction": 0.1, "data.synthetic.num_topics": 12,
        "data.synthetic.num_attributes": 2, "data.synthetic.num_train": 240, "data.synthetic.num_test": 40,
        "data.synthetic.max_images": 0, "data.synthetic.noise_words": 1, "model.name_or_path": "tiny:bert",
        "model.max_length": 12, "model.lexical.enabled": True, "model.lexical.negatives": 5,
        "model.lexical.candidates": 20, "model.lexical.weight": 0.3, "train.epochs": 1, "train.batch_size": 32,
        "train.warmup_steps": 2, "train.num_negatives": 4, "train.embed_chunk_rows": 16,
        "train.cluster.start_epoch": 5, "eval.k": 5, "eval.topk": 10, "index.num_shards": 2,
        "index.cpus_per_shard": 0, "infer.rows_per_part": 7,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    out = make_dataset(root / "data", cfg)
    cfg = load_config(None, [f"{k}={v}" for k, v in {**overrides, "data.dataset": out}.items()])
    return root, out, train(cfg, run_dir=str(root / "run"), resume=False)


def test_a_trained_model_carries_its_head_into_evaluate_and_the_predictor(
        ray_session: object, trained: tuple[Path, str, dict]) -> None:
    from inference_helpers import reference_embeddings
    from vixml_ray.data import open_dataset
    from vixml_ray.eval.evaluate import evaluate, read_predictions
    from vixml_ray.index import read_manifest, read_rows
    from vixml_ray.index.refresh import refresh_labels
    from vixml_ray.inference.export import read_export
    from vixml_ray.predict.predictor import Predictor, Query

    root, out, summary = trained
    export_uri = summary["checkpoint"]
    export = read_export(export_uri)
    head = export.lexical_head()
    assert export.meta["lexical"] and head is not None and summary["lexical_labels"] == int(head.trained.sum()) > 0
    assert export.meta["label_catalogue"] == open_dataset(out).label_catalogue()
    refresh_labels(export_uri, out, str(root / "index"))
    manifest = read_manifest(str(root / "index"))
    labels = read_rows(str(root / "index"), manifest, 0, manifest.num_labels)
    evaluate(export_uri, out, str(root / "eval"), index_dir=str(root / "index"))
    rows, got_ids, got_scores = read_predictions(str(root / "eval"))

    dataset = open_dataset(out)
    texts = dataset.texts("test")
    s = reference_embeddings(export_uri, out, "test") @ labels.T
    features = head.features(texts)
    h = np.stack([head.pair_scores(features, np.full(len(labels), q), np.arange(len(labels)))
                  for q in range(len(texts))])
    # candidates: the top 20 (more than eval.topk = 10 plus the filter pairs of any row, which set the depth otherwise)
    assert len(labels) > 20 and np.bincount(dataset.filter_pairs()[:, 0], minlength=1).max(initial=0) <= 10
    want_ids, want_scores = _numpy_rerank(s.astype(np.float64), np.zeros_like(s, dtype=np.float64), h, 1.0, 0.3, 20,
                                          10)
    assert (want_ids[:, 0] != np.argsort(-s, axis=1, kind="stable")[:, 0]).any()  # the head re-ranked some queries
    pairs = {tuple(p) for p in dataset.filter_pairs().tolist()}
    for row, ids, scores in zip(rows, got_ids, got_scores):
        keep = [i for i, label in enumerate(want_ids[row]) if (row, label) not in pairs]
        n = min(len(ids), 5)
        np.testing.assert_array_equal(ids[:n], want_ids[row][keep][:n])
        np.testing.assert_allclose(scores[:n], want_scores[row][keep][:n], atol=1e-4)

    with Predictor(export_uri, str(root / "index")) as predictor:
        predictions = predictor.predict([Query(texts[0]), Query(texts[1])], k=5)
    for q, prediction in enumerate(predictions):
        np.testing.assert_array_equal(prediction.ids, want_ids[q][:5])
