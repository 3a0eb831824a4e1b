"""Per-label classifier vectors: they start at the exact centroids, the frozen-encoder stage lowers its loss, two gloo
ranks take the same steps as one process, and a trained model's label index serves them (evaluation equals a
brute-force numpy scoring; a label without training queries keeps its text embedding; another label catalogue is
refused); joint training of the encoder and the vectors lowers its loss, resumes exactly and exports them."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from vixml_ray.config import ClassifierLossConfig, Config, ConfigError, load_config
from vixml_ray.data import open_dataset, prepare_dataset
from vixml_ray.data.synthetic import generate_synthetic
from vixml_ray.eval.metrics import xmc_metrics
from vixml_ray.model import embed_arrays, load_export, load_tokenizer, tokenize
from vixml_ray.train import train
from vixml_ray.train.classifiers import batch_gradient, make_batch, shortlist, train_classifiers

UNUSED_LABEL = "no-training-query"


def _embeddings(seed: int = 0, n: int = 600, num_labels: int = 40, dim: int = 16
                ) -> tuple[np.ndarray, sp.csr_matrix]:
    """Unit query embeddings around one centre per label (noisy, so the centroids leave room to learn); every 5th
    query has a second label; the last label has no query."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_labels, dim))
    first = rng.integers(0, num_labels - 1, n)
    second = (first + 1) % (num_labels - 1)
    emb = centres[first] + 1.2 * rng.normal(size=(n, dim))
    emb[::5] += centres[second[::5]]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = np.concatenate([np.arange(n), np.arange(0, n, 5)])
    labels = sp.csr_matrix((np.ones(len(rows)), (rows, np.concatenate([first, second[::5]]))), shape=(n, num_labels))
    return emb.astype(np.float32), labels


def _stage(**overrides: object) -> ClassifierLossConfig:
    base = {"epochs": 4, "batch_size": 64, "cluster_size": 16, "shortlist": 8, "lr": 0.02, "temperature": 0.05}
    return ClassifierLossConfig(**{**base, **overrides})


def test_vectors_start_at_the_exact_centroids_of_their_queries() -> None:
    emb, labels = _embeddings()
    result = train_classifiers(emb, labels, _stage(epochs=0), seed=0, device=torch.device("cpu"))
    dense = labels.toarray() > 0
    assert result.trained.tolist() == dense.any(0).tolist() and not result.trained[-1]
    for label in np.flatnonzero(result.trained):
        np.testing.assert_allclose(result.weight[label], emb[dense[:, label]].mean(0), rtol=1e-5, atol=1e-6)
    assert not result.weight[-1].any() and result.epochs == 0


def _p_at_1(emb: np.ndarray, labels: sp.csr_matrix, weight: np.ndarray, trained: np.ndarray) -> float:
    vectors = weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
    scores = np.where(trained[None, :], emb @ vectors.T, -np.inf)
    return float(labels[np.arange(len(emb)), scores.argmax(1)].mean())


def test_the_frozen_stage_lowers_its_loss_and_improves_on_the_centroids() -> None:
    emb, labels = _embeddings()
    result = train_classifiers(emb, labels, _stage(), seed=0, device=torch.device("cpu"))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True)
    start = train_classifiers(emb, labels, _stage(epochs=0), seed=0, device=torch.device("cpu"))
    assert _p_at_1(emb, labels, result.weight, result.trained) > _p_at_1(emb, labels, start.weight, start.trained)
    assert not result.weight[-1].any()  # a label without queries is never a candidate: its row stays empty


def test_the_stage_stops_when_the_budget_is_spent() -> None:
    emb, labels = _embeddings()
    calls = []
    result = train_classifiers(emb, labels, _stage(), seed=0, device=torch.device("cpu"),
                               stop=lambda: calls.append(1) is None and len(calls) > 3)
    assert result.epochs == 1 and result.history[0]["batches"] == 3


# ------------------------------------------------------------------------------------------- 2 ranks vs 1
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradient_and_training() -> dict[str, np.ndarray]:
    """One batch's loss and candidate gradient rows, then the vectors after a whole (2-epoch) stage."""
    emb, labels = _embeddings()
    queries = torch.as_tensor(emb)
    weight = torch.as_tensor(train_classifiers(emb, labels, _stage(epochs=0), 0, torch.device("cpu")).weight)
    table = torch.nn.Embedding.from_pretrained(weight, freeze=False, sparse=True)
    ids = torch.arange(labels.shape[1] - 1)
    short = shortlist(queries, table.weight, ids, 8)
    batch = make_batch(np.arange(3, 70), queries, labels, short)
    loss, grad = batch_gradient(table, batch, 0.05)
    trained = train_classifiers(emb, labels, _stage(epochs=2), 0, torch.device("cpu"))
    return {"loss": np.array(loss), "grad": grad.numpy(), "candidates": batch.candidates, "short": short,
            "weight": trained.weight}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        got = _gradient_and_training()
        if rank == 0:
            np.savez(out, **got)
    finally:
        torch_dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    want = _gradient_and_training()
    assert want["loss"] > 0 and np.abs(want["grad"]).sum() > 0
    out = str(tmp_path / "rank0.npz")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = np.load(out)
    np.testing.assert_array_equal(got["candidates"], want["candidates"])
    np.testing.assert_array_equal(got["short"], want["short"])
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    np.testing.assert_allclose(got["grad"], want["grad"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got["weight"], want["weight"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ trained model end to end
def _config(root: Path, dataset: str = "", **overrides: object) -> Config:
    base = {
        "cache_dir": str(root / "cache"), "data.dataset": dataset, "data.validation_fraction": 0.1,
        "data.synthetic.num_topics": 12, "data.synthetic.num_attributes": 2, "data.synthetic.num_train": 240,
        "data.synthetic.num_test": 40, "data.synthetic.max_images": 0, "data.synthetic.noise_words": 1,
        "model.name_or_path": "tiny:bert", "model.max_length": 12, "model.classifiers.enabled": True,
        "model.classifiers.fusion": 0.8, "train.epochs": 1, "train.batch_size": 32, "train.lr_backbone": 2e-3,
        "train.lr_projection": 2e-3, "train.warmup_steps": 2, "train.num_negatives": 4, "train.embed_chunk_rows": 16,
        "train.cluster.start_epoch": 5, "train.classifier_loss.epochs": 3, "train.classifier_loss.batch_size": 32,
        "train.classifier_loss.cluster_size": 8, "train.classifier_loss.shortlist": 4, "eval.k": 5, "eval.topk": 10,
        "index.num_shards": 2, "index.cpus_per_shard": 0, "infer.rows_per_part": 7,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base.items()])


def _dataset(root: Path, name: str, cfg: Config, extra_label: bool = True) -> str:
    """The synthetic dataset through the raw XC files, with one more label that no item has."""
    raw = root / f"{name}-raw"
    generate_synthetic(str(raw), cfg, fmt="xc")
    if extra_label:
        with gzip.open(raw / "lbl.json.gz", "at", encoding="utf-8") as f:
            f.write(json.dumps({"uid": UNUSED_LABEL, "title": "an unused label"}) + "\n")
    return prepare_dataset(str(raw), str(root / name), cfg)["out"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    root = tmp_path_factory.mktemp("classifiers")
    out = _dataset(root, "synthetic", _config(root))
    summary = train(_config(root, out), run_dir=str(root / "run"), resume=False)
    return root, out, summary


def test_training_runs_the_stage_and_exports_the_vectors(trained: tuple[Path, str, dict]) -> None:
    _, out, summary = trained
    assert summary["classifier_epochs"] == 3 and summary["classifier_final_loss"] < summary["classifier_first_loss"]
    export = load_export(summary["checkpoint"])
    dataset = open_dataset(out)
    classifiers = export.classifiers
    assert classifiers is not None and export.num_labels == dataset.num_labels
    assert export.label_catalogue == dataset.label_catalogue()
    assert classifiers.trained.sum() == summary["classifier_labels"] == dataset.num_labels - 1


def _served(export_uri: str, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(label text embeddings, expected served label vectors from the export's weights in numpy, test query
    embeddings, trained mask)."""
    export = load_export(export_uri).eval()
    ds = open_dataset(dataset)
    tokenizer = load_tokenizer(export.cfg.model, export.cfg.cache_dir)
    texts = {split: [str(t) for t in ds.table(split, ["text"]).column("text").to_pylist()]
             for split in ("label", "test")}
    text_emb = embed_arrays(export, tokenize(tokenizer, texts["label"], export.cfg.model.max_length))
    queries = embed_arrays(export, tokenize(tokenizer, texts["test"], export.cfg.model.max_length))
    weight = export.classifiers.weight.float().numpy()
    trained = export.classifiers.trained.numpy()
    alpha = export.cfg.model.classifiers.fusion
    w = weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
    fused = alpha * w + (1 - alpha) * text_emb
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    return text_emb, np.where(trained[:, None], fused, text_emb), queries, trained


def test_the_index_serves_classifier_vectors_and_evaluate_equals_numpy(
        ray_session: object, trained: tuple[Path, str, dict]) -> None:
    from vixml_ray.eval.evaluate import evaluate
    from vixml_ray.index.refresh import refresh_labels
    from vixml_ray.index.versions import read_manifest, read_rows

    root, out, summary = trained
    export = summary["checkpoint"]
    refresh_labels(export, out, str(root / "index"))
    text_emb, served, queries, trained_mask = _served(export, out)
    manifest = read_manifest(str(root / "index"))
    index = read_rows(str(root / "index"), manifest, 0, manifest.num_labels)
    np.testing.assert_allclose(index, served, atol=1e-5)
    unused = open_dataset(out).table("label", ["uid"]).column("uid").to_pylist().index(UNUSED_LABEL)
    assert not trained_mask[unused]
    np.testing.assert_allclose(index[unused], text_emb[unused], atol=1e-6)  # no training query: its text embedding
    assert not np.allclose(index[trained_mask], text_emb[trained_mask], atol=1e-3)

    metrics = evaluate(export, out, str(root / "eval"), index_dir=str(root / "index"))
    top = np.argsort(-(queries @ served.T), axis=1, kind="stable")[:, :5]
    want = xmc_metrics(top, open_dataset(out).label_matrix("test"), k=5)
    assert metrics["P@1"] == pytest.approx(float(want["P"][0]), abs=1e-6)
    assert metrics["P@5"] == pytest.approx(float(want["P"][4]), abs=1e-6)
    assert 100 * metrics["P@1"] == pytest.approx(summary["test_P@1"], abs=1e-3)


def test_the_export_refuses_another_label_catalogue(ray_session: object, trained: tuple[Path, str, dict],
                                                   tmp_path: Path) -> None:
    from vixml_ray.index.refresh import refresh_labels

    root, _, summary = trained
    other = _dataset(tmp_path, "other", _config(root), extra_label=False)  # the same labels but one
    with pytest.raises(ValueError, match="classifier vectors for .* another label set"):
        refresh_labels(summary["checkpoint"], other, str(tmp_path / "index"))
    assert not (tmp_path / "index").exists()


def test_a_fusion_of_zero_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fusion"):
        _config(tmp_path, **{"model.classifiers.fusion": 0})


def test_the_stage_alone_on_the_untrained_encoder(trained: tuple[Path, str, dict], tmp_path: Path) -> None:
    """``train.epochs=0``: no Siamese step, the classifier stage on the encoder as loaded, then test and export."""
    root, out, _ = trained
    summary = train(_config(root, out, **{"train.epochs": 0}), run_dir=str(tmp_path / "run"), resume=False)
    assert summary["steps"] == 0 and summary["classifier_epochs"] == 3 and "test_P@1" in summary
    assert load_export(summary["checkpoint"]).classifiers.trained.any()


# ------------------------------------------------------------------------------------------------ joint training
JOINT = {"train.classifier_loss.joint": True, "train.epochs": 3, "train.num_to_keep": 3}


def _epoch_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_joint_training_lowers_its_loss_resumes_exactly_and_exports_its_vectors(
        trained: tuple[Path, str, dict], tmp_path: Path) -> None:
    """``train.classifier_loss.joint``: the stage on the initial encoder, then epochs that train the encoder and the
    vectors together (labels never encoded); a run resumed from its first epoch's checkpoint repeats the losses and
    ends with the same vectors; the export serves them."""
    root, out, _ = trained
    cfg = _config(root, out, **JOINT)
    summary = train(cfg, run_dir=str(tmp_path / "run"), resume=False)
    losses = _epoch_losses(tmp_path / "run")
    assert summary["classifier_joint"] and summary["classifier_epochs"] == 3 and summary["steps"] > 0
    assert len(losses) == 3 and losses == sorted(losses, reverse=True) and losses[-1] < 0.6 * losses[0]
    export = load_export(summary["checkpoint"])
    assert int(export.classifiers.trained.sum()) == summary["classifier_labels"]

    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(checkpoints) == 3
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints[0], resumed / "checkpoints" / checkpoints[0].name)
    again = train(cfg, run_dir=str(resumed), resume=True)
    assert _epoch_losses(resumed) == pytest.approx(losses[1:], rel=1e-5, abs=1e-7)  # epochs 1 and 2 again
    assert again["classifier_first_loss"] == summary["classifier_first_loss"] and again["classifier_joint"]
    torch.testing.assert_close(load_export(again["checkpoint"]).classifiers.weight, export.classifiers.weight,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"model.classifiers.enabled": False}, "'model.classifiers.enabled' is false"),
    ({"model.prototypes.enabled": True}, "excludes 'model.prototypes.enabled'"),
    ({"model.dtype": "float16"}, "fp16 loss scaling"),
])
def test_joint_needs_classifiers_no_prototypes_and_no_fp16(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **JOINT, **overrides)
