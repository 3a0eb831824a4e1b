"""Import of ViXML's released image data: {trn,tst,lbl}_embs_imgs_*.npy + {train,test,labels}_imgs_*_map.npy
become the feature cache, img_urls.parquet becomes the image manifest (small arrays written here in that format)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vixml_ray.config import load_config
from vixml_ray.data import schema
from vixml_ray.data.dataset import open_dataset
from vixml_ray.data.synthetic import generate_synthetic
from vixml_ray.vision.bank import FeatureBank
from vixml_ray.vision.vixml_import import DEFAULT_SLUG, import_vixml

DIM = 8


@pytest.fixture()
def dataset(tmp_path) -> str:
    cfg = load_config(None, ["data.synthetic.num_train=12", "data.synthetic.num_test=5", "data.synthetic.num_topics=2"])
    out = str(tmp_path / "ds")
    generate_synthetic(out, cfg)
    return out


def _release(folder, n_train: int, n_test: int) -> dict[str, dict[int, list[np.ndarray]]]:
    """Writes train/test arrays in the released format; returns the expected vectors per split, row, slot."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for prefix, name, n in (("trn", "train", n_train), ("tst", "test", n_test)):
        embs = rng.normal(size=(20, DIM)).astype(np.float32)
        image_map = np.empty(n, dtype=object)
        image_map[:] = -1  # no images by default, as the release marks them
        image_map[0] = [4, 1]
        image_map[2] = [7, 8, 9, 10]  # more than 3 images: slots 0..2 are kept
        image_map[n - 1] = [19]
        np.save(folder / f"{prefix}_embs_imgs_3_{DIM}_siglip2.npy", embs)
        np.save(folder / f"{name}_imgs_384_3_map.npy", image_map, allow_pickle=True)
        expected[name] = {row: [embs[i] for i in rows[:3]] for row, rows in
                          ((r, image_map[r]) for r in range(n)) if rows != -1}
    return expected


def test_released_arrays_become_the_feature_cache(dataset, tmp_path):
    ds = open_dataset(dataset)
    expected = _release(tmp_path / "release", ds.num_train, ds.num_test)
    cfg = load_config(None, ["vision.cache_dtype=float32", "vision.rows_per_shard=3"])
    summary = import_vixml(dataset, str(tmp_path / "release"), cfg)["features"]
    assert summary["slug"] == DEFAULT_SLUG and summary["dim"] == DIM
    assert summary["splits_imported"] == ["test", "train"] and summary["images"] == 2 * (2 + 3 + 1)
    bank = FeatureBank.open(dataset)
    for split, n in (("train", ds.num_train), ("test", ds.num_test)):
        feats, mask = bank.get(split, np.arange(n))
        for row in range(n):
            vectors = expected[split].get(row, [])
            assert mask[row].tolist() == [slot < len(vectors) for slot in range(3)]
            for slot, vector in enumerate(vectors):
                assert np.array_equal(feats[row, slot].numpy(), vector)
    assert not bank.get("label", np.arange(ds.num_labels))[1].any()  # no label arrays released: no label images
    assert open_dataset(dataset).features()[DEFAULT_SLUG]["model"]["model_name"] == "google/siglip2-so400m-patch14-384"


def test_mismatched_release_is_rejected(dataset, tmp_path):
    ds = open_dataset(dataset)
    _release(tmp_path / "release", ds.num_train + 1, ds.num_test)
    with pytest.raises(ValueError, match=r"train_imgs_384_3_map\.npy: 13 entities, the dataset's train split has 12"):
        import_vixml(dataset, str(tmp_path / "release"), load_config())


def test_img_urls_become_the_image_manifest(dataset, tmp_path):
    ds = open_dataset(dataset)
    train, labels = ds.uids("train"), ds.uids("label")
    release = tmp_path / "release"
    release.mkdir()
    ids = [train[1]] * 4 + [labels[0], "not-in-this-dataset", train[3], train[3]]
    urls = [f"https://img.example/{i}.jpg" for i in range(8)]
    urls[6] = ""  # an empty URL is dropped
    pq.write_table(pa.table({"id": ids, "url": urls}), release / "img_urls.parquet")
    with pytest.raises(FileExistsError, match="already lists"):  # the synthetic dataset has its own images
        import_vixml(dataset, str(release), load_config())

    pq.write_table(schema.IMAGES_SCHEMA.empty_table(), f"{ds.uri}/{schema.IMAGES_FILE}")  # as prepare_data leaves it
    summary = import_vixml(dataset, str(release), load_config())
    assert summary["image_manifest"]["images"] == 5
    manifest = open_dataset(dataset).image_manifest().to_pylist()
    assert [(m["split"], m["row"], m["slot"], m["uri"]) for m in manifest] == [
        ("train", 1, 0, urls[0]), ("train", 1, 1, urls[1]), ("train", 1, 2, urls[2]),
        ("train", 3, 0, urls[7]), ("label", 0, 0, urls[4])]
