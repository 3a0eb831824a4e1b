"""Label refresh: a committed version equal to single-process embeddings; incremental refresh re-embeds exactly the
labels whose text or images changed; an interrupted refresh leaves the current version serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from inference_helpers import (
    inference_config,
    make_dataset,
    make_export,
    reference_embeddings,
    write_random_features,
)
from vixml_ray.errors import ConfigError
from vixml_ray.index import ShardedIndex, current_version, list_versions, read_manifest, read_rows
from vixml_ray.index.refresh import refresh_labels
from vixml_ray.index.tables import read_labels
from vixml_ray.inference.export import job_config, read_export

ROOT = Path(__file__).resolve().parent.parent
TEXT_CHANGED, IMAGES_CHANGED = (1, 5), (2, 7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Dataset A, dataset B (= A with the texts of TEXT_CHANGED and the images of IMAGES_CHANGED changed), export."""
    tmp = tmp_path_factory.mktemp("refresh")
    cfg = inference_config(tmp)
    a = make_dataset(tmp / "a", cfg)
    write_random_features(a, cfg)
    b = make_dataset(tmp / "b", cfg, {row: f"renamed label {row}" for row in TEXT_CHANGED})
    write_random_features(b, cfg, salted_label_rows=IMAGES_CHANGED)
    return {"tmp": tmp, "cfg": cfg, "a": a, "b": b, "export": make_export(tmp / "export", cfg)}


def all_rows(index_dir: str, version: str | None = None) -> np.ndarray:
    manifest = read_manifest(index_dir, version)
    return read_rows(index_dir, manifest, 0, manifest.num_labels)


def test_full_refresh_commits_a_version_equal_to_single_process_embeddings(ray_session, setup):
    index = str(setup["tmp"] / "full")
    summary = refresh_labels(setup["export"], setup["a"], index)
    labels = read_labels(index, "v1")
    assert summary["version"] == "v1" and current_version(index) == "v1"
    assert summary["labels"] == summary["embedded"] == labels.num_rows == 30 and summary["carried"] == 0
    np.testing.assert_allclose(all_rows(index), reference_embeddings(setup["export"], setup["a"], "label"), atol=1e-5)

    manifest = read_manifest(index)
    assert all(f.num_rows <= setup["cfg"].infer.rows_per_part for f in manifest.files) and len(manifest.files) >= 5
    assert manifest.identity["export"]["fingerprint"] == read_export(setup["export"]).fingerprint
    assert manifest.identity["features"]["slug"] == "vixml-tiny-vit.random"
    assert manifest.identity["refresh"] == {"mode": "full", "base_version": None, "embedded": 30, "carried": 0,
                                            "reason": "full refresh"}
    assert labels.column("source_version").to_pylist() == ["v1"] * 30
    assert labels.column("text").to_pylist() == pq.read_table(Path(setup["a"]) / "labels.parquet").column(
        "text").to_pylist()
    assert (Path(index) / "versions" / "v1" / "config.yaml").is_file()


@pytest.mark.slow
def test_incremental_refresh_reembeds_exactly_the_changed_labels(ray_session, setup):
    index = str(setup["tmp"] / "incremental")
    refresh_labels(setup["export"], setup["a"], index)
    v1 = all_rows(index, "v1")

    summary = refresh_labels(setup["export"], setup["b"], index, incremental=True)
    changed = sorted(TEXT_CHANGED + IMAGES_CHANGED)
    source = np.asarray(read_labels(index, "v2").column("source_version").to_pylist())
    assert summary["version"] == "v2" and current_version(index) == "v2"
    assert (summary["embedded"], summary["carried"]) == (len(changed), 30 - len(changed))
    assert np.flatnonzero(source == "v2").tolist() == changed
    v2 = all_rows(index, "v2")
    unchanged = np.setdiff1d(np.arange(30), changed)
    assert np.array_equal(v2[unchanged], v1[unchanged])  # carried bit for bit
    assert not np.allclose(v2[changed], v1[changed], atol=1e-3)
    np.testing.assert_allclose(v2, reference_embeddings(setup["export"], setup["b"], "label"), atol=1e-5)

    again = refresh_labels(setup["export"], setup["b"], index, incremental=True)
    assert (again["version"], again["embedded"], again["carried"]) == ("v3", 0, 30)
    assert read_labels(index, "v3").column("source_version").to_pylist() == source.tolist()
    assert np.array_equal(all_rows(index, "v3"), v2)


@pytest.mark.slow
def test_incremental_refresh_with_another_export_reembeds_everything(ray_session, setup):
    index = str(setup["tmp"] / "other-export")
    refresh_labels(setup["export"], setup["a"], index)
    other = make_export(setup["tmp"] / "export-other", setup["cfg"], seed=1)
    summary = refresh_labels(other, setup["a"], index, incremental=True)
    assert (summary["embedded"], summary["carried"]) == (30, 0)
    assert "another export" in summary["reason"]
    np.testing.assert_allclose(all_rows(index), reference_embeddings(other, setup["a"], "label"), atol=1e-5)


def test_job_config_refuses_to_change_the_model(setup):
    cfg = job_config(setup["export"], None, ["infer.batch_size=4", "index.num_shards=3"])
    assert (cfg.infer.batch_size, cfg.index.num_shards, cfg.model.name_or_path) == (4, 3, "tiny:bert")
    with pytest.raises(ConfigError, match="'model.max_length': 20"):
        job_config(setup["export"], None, ["model.max_length=20"])
    with pytest.raises(ConfigError, match="'vision.model_name'"):
        job_config(setup["export"], None, ["vision.model_name=ViT-B-16-SigLIP2"])


def test_an_actor_pool_taking_every_cpu_is_refused(ray_session, setup):
    """The pipeline's read and write tasks need a CPU beside the embedding actors (else Ray Data waits forever)."""
    cfg = job_config(setup["export"], None, ["infer.num_cpus_per_actor=2"])  # the session's Ray has 2 CPUs
    index = str(setup["tmp"] / "index-every-cpu")
    with pytest.raises(ConfigError, match="'infer.num_cpus_per_actor'=2"):
        refresh_labels(setup["export"], setup["a"], index, cfg)
    assert list_versions(index, committed_only=False) == []


@pytest.mark.slow
def test_interrupted_refresh_leaves_the_current_version_serving(ray_session, setup):
    index = str(setup["tmp"] / "interrupted")
    refresh_labels(setup["export"], setup["a"], index)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "refresh_labels.py"), "--checkpoint",
                            setup["export"], "--dataset", setup["b"], "--out", index],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    claimed = Path(index) / "versions" / "v2"
    deadline = time.monotonic() + 180
    while not claimed.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # the job claims v2 before its embedding pipeline starts
    assert job.wait(timeout=60) == -signal.SIGKILL and claimed.exists()

    assert current_version(index) == "v1" and list_versions(index) == ["v1"]
    with ShardedIndex(index, setup["cfg"].index) as served:
        result = served.search(all_rows(index, "v1")[:3], k=2)
    assert result.version == "v1" and result.ids[:, 0].tolist() == [0, 1, 2]
    assert refresh_labels(setup["export"], setup["b"], index)["version"] == "v3"  # v2 is never reused
    assert current_version(index) == "v3" and list_versions(index) == ["v1", "v3"]


def test_training_query_hashes_leave_the_texts_behind(setup):
    """The refresh keeps one (row, uid, hash) row per training query in the driver for the whole run: at 2.2M
    queries their texts would double its memory, so that table holds none (same hashes as with texts)."""
    from vixml_ray.data.dataset import open_dataset
    from vixml_ray.index.refresh import content_hashes

    dataset = open_dataset(setup["a"])
    with_text = content_hashes(setup["cfg"], dataset, "train", None)
    without = content_hashes(setup["cfg"], dataset, "train", None, keep_text=False)
    assert without.column_names == ["row", "uid", "content_hash"] and "text" in with_text.column_names
    assert without.column("content_hash").equals(with_text.column("content_hash"))
