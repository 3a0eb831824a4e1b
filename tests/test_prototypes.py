"""PRIME label prototypes: shapes, updates and switches of the model part, exact centroids, the objective's terms,
the export round trip, and the training loop with prototypes end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from vixml_ray.config import Config, load_config
from vixml_ray.data.synthetic import generate_synthetic
from vixml_ray.errors import ConfigError
from vixml_ray.model import build_embedder, load_export
from vixml_ray.model.prototypes import num_prototype_clusters
from vixml_ray.train import train
from vixml_ray.train.local import LocalRuntime
from vixml_ray.train.loop import build_trainer
from vixml_ray.train.loss import PrimeLossConfig, TripletLossConfig, prime_loss, prototype_regularizer
from vixml_ray.train.prototypes import cluster_labels, label_centroids
from vixml_ray.train.validation import embed_rows

HIDDEN, NUM_LABELS = 64, 10


def _config(root: Path, dataset: str = "", **overrides: object) -> Config:
    base = {
        "cache_dir": str(root / "cache"), "data.dataset": dataset, "data.validation_fraction": 0.1,
        "data.synthetic.num_topics": 12, "data.synthetic.num_attributes": 2, "data.synthetic.num_train": 240,
        "data.synthetic.num_test": 40, "data.synthetic.max_images": 0, "data.synthetic.noise_words": 1,
        "model.name_or_path": "tiny:bert", "model.max_length": 12,
        "model.prototypes.enabled": True, "model.prototypes.num_clusters": 8, "model.prototypes.dropout": 0.0,
        "train.epochs": 2, "train.batch_size": 32, "train.lr_backbone": 2e-3, "train.lr_projection": 2e-3,
        "train.lr_prototypes": 3e-3, "train.warmup_steps": 2, "train.num_negatives": 4, "train.embed_chunk_rows": 16,
        "train.cluster.start_epoch": 1, "train.cluster.refresh_every": 1, "train.cluster.initial_size": 4,
        "train.cluster.double_at": [], "eval.k": 5, "eval.topk": 10,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base.items()])


def test_prototypes_have_the_right_shapes_and_all_parts_train(tmp_path: Path) -> None:
    embedder = build_embedder(_config(tmp_path), None, NUM_LABELS)
    protos = embedder.prototypes
    assert protos.free.shape == (8, HIDDEN) and protos.centroid.shape == (NUM_LABELS, HIDDEN)
    rng = np.random.default_rng(0)
    label_emb = rng.normal(size=(NUM_LABELS, HIDDEN)).astype(np.float32)
    clusters = np.arange(NUM_LABELS) % 8
    protos.set_clusters(clusters, label_emb)
    np.testing.assert_allclose(protos.free[0].detach().numpy(), label_emb[[0, 8]].mean(0), rtol=1e-6)
    protos.set_centroids(rng.normal(size=(NUM_LABELS, HIDDEN)), np.arange(NUM_LABELS) < 7)
    text = torch.nn.functional.normalize(torch.randn(5, HIDDEN, requires_grad=True), dim=-1)
    out = embedder.label_vectors(text, torch.tensor([0, 3, 7, 8, 9]))
    assert out.shape == (5, HIDDEN)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    out.sum().backward()
    assert protos.free.grad[[0, 3, 7]].abs().sum() > 0 and protos.free.grad[[2, 4, 5, 6]].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in protos.combiner.parameters())
    groups = {g["name"]: g["lr"] for g in embedder.param_groups(1e-5, 1e-3, 0.01, lr_prototypes=7e-4)}
    assert groups["prototypes"] == groups["prototypes_no_decay"] == 7e-4 and groups["backbone"] == 1e-5


def test_a_label_without_queries_uses_its_text_embedding_as_centroid(tmp_path: Path) -> None:
    protos = build_embedder(_config(tmp_path), None, NUM_LABELS).prototypes.eval()
    text = torch.nn.functional.normalize(torch.randn(1, HIDDEN), dim=-1)
    row = torch.tensor([4])
    protos.set_centroids(np.zeros((NUM_LABELS, HIDDEN)), np.zeros(NUM_LABELS, dtype=bool))
    without = protos(text, row)
    centroid = np.zeros((NUM_LABELS, HIDDEN), dtype=np.float32)
    centroid[4] = text.numpy()[0]
    protos.set_centroids(centroid, np.ones(NUM_LABELS, dtype=bool))
    torch.testing.assert_close(protos(text, row), without)
    centroid[4] = -centroid[4]
    protos.set_centroids(centroid, np.ones(NUM_LABELS, dtype=bool))
    assert not torch.allclose(protos(text, row), without)


def test_centroids_are_exact_means_of_the_queries_of_each_label() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 6)).astype(np.float32)
    labels = sp.random(30, 9, density=0.2, format="csr", random_state=1) @ sp.diags([1.0] * 8 + [0.0])
    labels = sp.csr_matrix(labels)
    labels.eliminate_zeros()
    labels.data[:] = 2.0  # relevance values do not weigh the mean
    centroid, has = label_centroids(emb, labels)
    dense = labels.toarray() > 0
    for label in range(9):
        members = np.flatnonzero(dense[:, label])
        assert has[label] == bool(len(members))
        want = emb[members].mean(0) if len(members) else np.zeros(6)
        np.testing.assert_allclose(centroid[label], want, rtol=1e-5, atol=1e-6)
    assert not has[8]


def test_centroids_hold_one_label_by_hidden_array() -> None:
    """The centroids of many labels are summed in column blocks: the only [L, H] array is the float32 result (the
    float64 sums of all of it, their quotient and its cast were 5 such arrays), with the same values."""
    import tracemalloc

    rng = np.random.default_rng(0)
    num_labels, hidden, rows = 40_000, 32, 2_000
    emb = rng.normal(size=(rows, hidden)).astype(np.float32)
    labels = sp.csr_matrix((np.ones(rows * 3), rng.integers(0, num_labels, rows * 3), np.arange(0, rows * 3 + 1, 3)),
                           shape=(rows, num_labels))
    one = num_labels * hidden * 4
    tracemalloc.start()
    centroid, has = label_centroids(emb, labels, chunk_bytes=one // 8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.5 * one, (peak, one)
    whole, _ = label_centroids(emb, labels, chunk_bytes=1 << 40)  # one block: the plain float64 computation
    np.testing.assert_array_equal(centroid, whole)
    assert has.sum() == len(np.unique(labels.indices))


def test_label_clusters_are_balanced_and_powers_of_two() -> None:
    assert num_prototype_clusters(65536, 736) == 736 and num_prototype_clusters(100, 736) == 64
    emb = np.random.default_rng(0).normal(size=(736, 8)).astype(np.float32)
    ids = cluster_labels(emb, 64, seed=0)
    assert set(np.bincount(ids, minlength=64)) <= {11, 12}
    np.testing.assert_array_equal(cluster_labels(emb[:5], 5, seed=0), np.arange(5))
    many = np.random.default_rng(1).normal(size=(11387, 4)).astype(np.float32)  # dnb's label count
    for requested in (8192, 2, 65536):
        count = num_prototype_clusters(requested, len(many))
        assert len(np.unique(cluster_labels(many, count, seed=0))) == count


def test_prime_loss_terms_and_switches() -> None:
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    protos = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    pos = torch.tensor([0, 1, 2, 3, 4, 0])
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[torch.arange(6), pos] = True
    cfg = TripletLossConfig(num_negatives=3)
    only_text = prime_loss(q, text, protos, pos, mask, cfg, PrimeLossConfig(1.0, 0.0, False, 0.0))
    from vixml_ray.train.loss import triplet_loss

    torch.testing.assert_close(only_text, triplet_loss(q, text, pos, mask, cfg))
    regularizer = prime_loss(q, text, protos, pos, mask, cfg, PrimeLossConfig(0.0, 0.0, False, 1.0, 0.1))
    assert regularizer > 0
    regularizer.backward()
    assert text.grad is None and protos.grad.abs().sum() > 0  # text scores are targets of the regulariser
    # prototypes that beat every text score by the margin: no regulariser loss
    assert prototype_regularizer(q[:5], torch.zeros(5, 8), q[:5], pos[:5], mask[:5], 3, 0.1).item() == 0.0


def test_prototypes_must_be_trained_by_some_term(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prototype_weight"):
        _config(tmp_path, **{"train.prototype_loss.prototype_weight": 0, "train.prototype_loss.regularizer_weight": 0})


def test_prototypes_need_the_label_count_and_a_head_count_dividing_the_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="number of labels"):
        build_embedder(_config(tmp_path), None)
    with pytest.raises(ConfigError, match="model.prototypes.heads"):
        build_embedder(_config(tmp_path, **{"model.prototypes.heads": 3}), None, NUM_LABELS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("prototypes")
    out = str(root / "synthetic")
    generate_synthetic(out, _config(root, out))
    return root, out


def test_epoch_start_sets_exact_centroids_of_the_training_queries(dataset: tuple[Path, str]) -> None:
    root, out = dataset
    cfg = _config(root, out)
    trainer = build_trainer(cfg, LocalRuntime(str(root / "epoch-start"), num_to_keep=1, resume=False))
    protos = trainer.engine.embedder.prototypes
    assert len(np.unique(protos.label_cluster.numpy())) == protos.num_clusters == 8
    trainer.start_epoch(0)
    rows = trainer.sampler.rows
    emb = embed_rows(trainer.engine.embedder, trainer.inputs.tokens["train"], None, "train", rows, 64,
                     torch.device("cpu"))
    labels = trainer.inputs.train_labels[rows].toarray() > 0
    for label in range(labels.shape[1]):
        if labels[:, label].any():
            np.testing.assert_allclose(protos.centroid[label].numpy(), emb[labels[:, label]].mean(0), atol=1e-5)
    assert protos.has_centroid.numpy().tolist() == labels.any(0).tolist()


@pytest.fixture(scope="module")
def trained(dataset: tuple[Path, str]) -> dict:
    root, out = dataset
    return train(_config(root, out), run_dir=str(root / "run"), resume=False)


def test_training_with_prototypes_learns_and_exports_them(trained: dict) -> None:
    summary = trained
    assert summary["final_loss"] < summary["first_loss"] and summary["val_P@1"] > 20
    export = load_export(summary["checkpoint"]).eval()
    trained = export.prototypes
    assert trained is not None and trained.has_centroid.any() and export.num_labels == trained.num_labels
    text = torch.nn.functional.normalize(torch.randn(3, HIDDEN), dim=-1)
    rows = torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert not torch.allclose(export.label_vectors(text, rows), text)


def test_the_label_index_serves_prototypes(ray_session: object, dataset: tuple[Path, str], trained: dict) -> None:
    """refresh_labels writes prototype vectors, so evaluation through the sharded index gives the training loop's
    own brute-force test metrics (which score labels by their prototypes)."""
    from vixml_ray.eval.evaluate import evaluate
    from vixml_ray.index.refresh import refresh_labels

    root, out = dataset
    export = trained["checkpoint"]
    refresh_labels(export, out, str(root / "index"))
    metrics = evaluate(export, out, str(root / "eval"), index_dir=str(root / "index"))
    assert 100 * metrics["P@1"] == pytest.approx(trained["test_P@1"], abs=1e-3)
    assert 100 * metrics["P@5"] == pytest.approx(trained["test_P@5"], abs=1e-3)


def test_prototypes_refuse_another_label_set(ray_session: object, dataset: tuple[Path, str], trained: dict,
                                             tmp_path: Path) -> None:
    """Prototypes are per label row: refreshing them over a different label catalogue is an error, not a silent
    mix-up of labels."""
    from vixml_ray.index.refresh import refresh_labels

    root, out = dataset
    other = str(tmp_path / "other")
    generate_synthetic(other, _config(root, other, **{"data.synthetic.num_topics": 13}))
    with pytest.raises(ValueError, match="another label set"):
        refresh_labels(trained["checkpoint"], other, str(tmp_path / "index"))
    assert not (tmp_path / "index").exists()


def test_a_time_budget_stops_training_and_still_exports(dataset: tuple[Path, str], tmp_path: Path) -> None:
    root, out = dataset
    summary = train(_config(root, out, **{"train.max_minutes": 1e-6, "model.prototypes.enabled": False}),
                    run_dir=str(tmp_path / "budget"), resume=False)
    assert summary["steps"] == 1 and summary["epochs"] == 0 and "test_P@1" in summary
    assert (Path(summary["checkpoint"]) / "trainable.safetensors").is_file()


def test_the_budget_covers_the_prototype_set_up_and_the_final_centroids(dataset: tuple[Path, str],
                                                                         tmp_path: Path) -> None:
    """The label clustering before the loop is inside ``train.max_minutes``: a budget it alone exceeds leaves no
    step (the plain model above still gets one), yet the run still computes the final centroids, tests and exports,
    and reports its training-side seconds."""
    root, out = dataset
    summary = train(_config(root, out, **{"train.max_minutes": 1e-6}), run_dir=str(tmp_path / "budget"),
                    resume=False)
    assert summary["steps"] == 0 and summary["train_side_s"] > 0 and "test_P@1" in summary
    assert load_export(summary["checkpoint"]).prototypes.has_centroid.any()
    # the set-up's seconds start the budget's clock of a fresh run
    trainer = build_trainer(_config(root, out), LocalRuntime(str(tmp_path / "setup"), num_to_keep=1, resume=False))
    assert trainer.state.train_s > 0


def test_the_budget_reserves_the_lexical_heads_passes(dataset: tuple[Path, str], tmp_path: Path) -> None:
    """With the lexical head, the end of training embeds the training queries and every label (the head's
    shortlists): the budget reserves both passes at the latest embedding rate."""
    root, out = dataset
    trainers = [build_trainer(_config(root, out, **{"model.prototypes.enabled": False, "model.lexical.enabled": on}),
                              LocalRuntime(str(tmp_path / str(on)), num_to_keep=1, resume=False))
                for on in (False, True)]
    for trainer in trainers:
        trainer.embed_s_per_row = 0.5
    plain, lexical = trainers
    assert lexical._end_passes_s() - plain._end_passes_s() == pytest.approx(
        0.5 * (len(lexical.sampler.rows) + lexical.inputs.dataset.num_labels))

