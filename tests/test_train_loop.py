"""The training loop end to end on a tiny model and synthetic data: the loss falls, validation runs, clusters are
used, the export is published, and a run resumed from a checkpoint repeats the uninterrupted run's losses."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from vixml_ray.config import Config, load_config
from vixml_ray.data.synthetic import generate_synthetic
from vixml_ray.train import train
from vixml_ray.train.loop import EpochProgress

# Golden losses of this run (measured twice, identical): the first step's and the per-epoch means. A change to the
# model, the data, the sampler or the loss that moves them must be deliberate.
FIRST_LOSS = 0.3183591663837433
EPOCH_LOSSES = [0.13509092344479126, 0.07878715544939041, 0.07066975394263864]  # transformers' linear warm-up schedule


def _config(root: Path, dataset: str, **overrides: object) -> Config:
    base = {
        "cache_dir": str(root / "cache"),
        "data.dataset": dataset,
        "data.validation_fraction": 0.1,
        "data.synthetic.num_topics": 20,
        "data.synthetic.num_attributes": 2,
        "data.synthetic.num_train": 400,
        "data.synthetic.num_test": 60,
        "data.synthetic.max_images": 0,
        "data.synthetic.noise_words": 1,
        "model.name_or_path": "tiny:bert",
        "model.max_length": 12,
        "train.epochs": 3,
        "train.batch_size": 32,
        "train.lr_backbone": 2e-3,
        "train.lr_projection": 2e-3,
        "train.warmup_steps": 3,
        "train.num_negatives": 4,
        "train.embed_chunk_rows": 16,
        "train.cluster.start_epoch": 1,
        "train.cluster.refresh_every": 2,
        "train.cluster.initial_size": 4,
        "train.cluster.double_at": [2],
        "train.num_to_keep": 5,
        "eval.k": 5,
        "eval.topk": 10,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("train")
    out = str(root / "synthetic")
    generate_synthetic(out, _config(root, out))
    return root, out


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_learns_and_resumes_exactly(dataset: tuple[Path, str]) -> None:
    root, data = dataset
    cfg = _config(root, data)
    run = root / "run"
    summary = train(cfg, run_dir=str(run))

    history = _losses(run)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert [h["cluster_size"] for h in history] == [0, 4, 8]  # random, clusters of 4, merged siblings of 8
    assert summary["first_loss"] == pytest.approx(FIRST_LOSS, abs=1e-5)
    assert [h["loss"] for h in history] == pytest.approx(EPOCH_LOSSES, abs=1e-5)
    assert summary["final_loss"] < 0.5 * summary["first_loss"]
    # 40 labels (20 topics x 2 attributes); texts name the topic only, so text-only P@1 tops out near 50
    assert summary["val_P@1"] > 25.0
    assert summary["test_P@1"] > 25.0 and "test_PSP@1" in summary
    assert summary["samples_per_s"] > 0
    assert (Path(summary["checkpoint"]) / "trainable.safetensors").is_file()
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert len(checkpoints) == 3
    assert (run / "curves.png").stat().st_size > 0

    # a worker "killed" after logging all 3 epochs with only epoch 0's checkpoint kept continues identically, and
    # the epochs it reports again replace their lines instead of being logged twice
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints[0], resumed / "checkpoints" / checkpoints[0].name)
    shutil.copy(run / "metrics.jsonl", resumed / "metrics.jsonl")
    again = train(cfg, run_dir=str(resumed))
    replay = _losses(resumed)
    assert [h["epoch"] for h in replay] == [0, 1, 2]
    assert replay[0] == history[0]
    for original, repeated in zip(history[1:], replay[1:]):
        assert repeated["loss"] == pytest.approx(original["loss"], rel=1e-5, abs=1e-7)
        assert repeated["val_P@1"] == original["val_P@1"]
    assert again["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-5, abs=1e-7)
    assert again["first_loss"] == summary["first_loss"]


def test_epoch_progress_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Rank 0 logs batch/batches, the mean loss since the previous line, samples/s and the time left in the epoch;
    a resumed epoch counts from its first batch; 0 s = no lines."""
    caplog.set_level(logging.INFO, logger="vixml_ray.train.loop")
    progress = EpochProgress(epoch=2, batches=10, first=4, every_s=1e-9)
    progress.after(4, [1.0], queries=32)
    progress.after(5, [1.0, 0.5], queries=64)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert re.fullmatch(r"epoch 2 batch 5/10 loss 1\.0000 [\d.]+ samples/s, \d+:\d\d:\d\d left in the epoch", lines[0])
    assert lines[1].startswith("epoch 2 batch 6/10 loss 0.5000 ")
    caplog.clear()
    silent = EpochProgress(epoch=0, batches=10, first=0, every_s=0.0)
    silent.after(0, [1.0], queries=32)
    assert not caplog.records


def test_final_test_scores_the_eval_sample(dataset: tuple[Path, str], tmp_path: Path) -> None:
    """With eval.sample_size the end-of-training test embeds and scores only the evaluate job's sample of rows (the
    brute-force scan is test rows x labels), and its metrics are those rows' metrics of the full split."""
    import numpy as np

    from vixml_ray.train.loop import build_trainer
    from vixml_ray.train.runtime import LocalRuntime
    from vixml_ray.eval.metrics import inverse_propensity
    from vixml_ray.train.validation import embed_rows, validation_metrics

    root, out = dataset
    cfg = _config(root, out, **{"eval.sample_size": 17, "eval.sample_seed": 4})
    trainer = build_trainer(cfg, LocalRuntime(str(tmp_path / "run"), num_to_keep=1, resume=False, device="cpu"))
    rows = trainer.inputs.dataset.sample_rows("test", 17, 4)
    assert len(rows) == 17 and np.array_equal(rows, np.sort(np.random.default_rng(4).choice(60, 17, replace=False)))
    every = embed_rows(trainer.engine.embedder, trainer.inputs.tokens["test"], None, "test", np.arange(60), 64,
                       trainer.runtime.device)
    inv = inverse_propensity(trainer.inputs.train_labels, cfg.eval.propensity_a, cfg.eval.propensity_b)
    expected = validation_metrics(every[rows], trainer.label_embeddings(), trainer.inputs.test_labels[rows], k=5,
                                  topk=10, device=trainer.runtime.device, inv_propensity=inv, prefix="test_")
    assert trainer.test() == pytest.approx(expected, abs=1e-3)
