"""Reading prepared datasets back: splits, validation rows, feature registration, content hash."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from vixml_ray.config import load_config
from vixml_ray.data import generate_synthetic, open_dataset, register_features, split_validation
from vixml_ray.data.writer import hash_files

SMALL = ["data.synthetic.num_train=300", "data.synthetic.num_test=60", "data.synthetic.num_topics=10",
         "data.synthetic.num_attributes=3", "data.synthetic.image_size=16"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "synthetic"
    generate_synthetic(str(out), load_config(None, SMALL))
    return out


def test_tables_and_matrices(small_dataset: Path) -> None:
    ds = open_dataset(str(small_dataset))
    assert (ds.num_train, ds.num_test, ds.num_labels) == (300, 60, 30)
    train = ds.table("train")
    assert train.column("row").to_pylist() == list(range(300))
    assert ds.table("test", ["uid"]).column_names == ["uid"]
    y = ds.label_matrix("train")
    assert y.shape == (300, 30) and y.nnz == 300
    assert y.indices.tolist() == [ls[0] for ls in train.column("labels").to_pylist()]
    sub = ds.label_matrix("train", rows=np.array([5, 2]))
    assert (sub.toarray() == y[[5, 2]].toarray()).all()
    assert sum(b.num_rows for b in ds.iter_batches("train", ["text"], batch_rows=128)) == 300
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ds.table("dev")


def test_label_counts_stream_the_split(small_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """label_counts reads record batches (never the whole split) and counts like the label matrix does."""
    ds = open_dataset(str(small_dataset))
    expected = np.bincount(ds.label_matrix("train").indices, minlength=30)
    batches = []
    iter_batches = ds.iter_batches
    monkeypatch.setattr(ds, "iter_batches", lambda *a, **kw: (batches.append(b.num_rows) or b
                                                              for b in iter_batches(*a, **{**kw, "batch_rows": 64})))
    monkeypatch.setattr(ds, "table", lambda *a, **kw: pytest.fail("label_counts read a whole table"))
    assert ds.label_counts("train").tolist() == expected.tolist()
    assert batches == [64, 64, 64, 64, 44]
    with pytest.raises(ValueError, match="'train' or 'test'"):
        ds.label_counts("label")


def test_validation_rows_are_deterministic_and_disjoint(small_dataset: Path) -> None:
    ds = open_dataset(str(small_dataset))
    data = load_config(None, ["data.validation_fraction=0.1", "data.max_validation=20"]).data
    train, val = ds.validation_rows(data, seed=3)
    assert len(val) == 20 and len(train) == 280  # 10% = 30, capped at 20
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(300))
    again = ds.validation_rows(data, seed=3)
    assert np.array_equal(again[1], val) and np.array_equal(again[0], train)
    assert not np.array_equal(ds.validation_rows(data, seed=4)[1], val)
    assert len(split_validation(100, 0.0, 50, 0)[1]) == 0


def test_register_features_updates_manifest(small_dataset: Path) -> None:
    threads = [threading.Thread(target=register_features, args=(str(small_dataset), f"model-{i}", {"dim": i}))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    features = open_dataset(str(small_dataset)).features()
    assert {k: v["dim"] for k, v in features.items()} == {f"model-{i}": i for i in range(8)}
    with pytest.raises(ValueError, match="invalid feature model slug"):
        register_features(str(small_dataset), "../x", {})


def test_content_hash_matches_files(small_dataset: Path) -> None:
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    files, content_hash = hash_files(str(small_dataset), exclude=("manifest.json", "config.yaml",
                                                                  ".manifest.lock"))
    assert files == manifest["files"] and content_hash == manifest["content_hash"]
    assert set(files) == {"train.parquet", "test.parquet", "labels.parquet", "filters.parquet", "images.parquet",
                          "images/"}


def test_schema_version_and_missing_manifest(tmp_path: Path, small_dataset: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        open_dataset(str(tmp_path))
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema version 999"):
        open_dataset(str(tmp_path))
