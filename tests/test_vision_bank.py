"""The feature cache (shards -> bank -> manifest entry) and the memory-mapped FeatureBank that training reads."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from vixml_ray.config import load_config
from vixml_ray.data.dataset import open_dataset
from vixml_ray.data.synthetic import generate_synthetic
from vixml_ray.errors import IncompatibleArtifactError
from vixml_ray.vision import cache
from vixml_ray.vision.bank import FeatureBank

DIM = 6


@pytest.fixture()
def dataset(tmp_path) -> str:
    cfg = load_config(None, ["data.synthetic.num_train=12", "data.synthetic.num_test=5", "data.synthetic.num_topics=2"])
    out = str(tmp_path / "ds")
    generate_synthetic(out, cfg)
    return out


def _write_cache(dataset: str, slug: str, rows_per_shard: int, seed: int) -> dict[tuple[str, int, int], np.ndarray]:
    """Writes a cache for the dataset's image manifest with random vectors (every 5th image invalid); returns the
    expected vector of every valid (split, row, slot)."""
    ds = open_dataset(dataset)
    manifest = ds.image_manifest()
    rng = np.random.default_rng(seed)
    n = manifest.num_rows
    columns = {k: np.asarray(manifest.column(k).to_pylist(), dtype=object if k in ("split", "uid") else None)
               for k in ("split", "row", "uid", "slot")}
    columns["valid"] = np.arange(n) % 5 != 0
    columns["reason"] = np.where(columns["valid"], "", "corrupt").astype(object)
    columns["converted"] = np.full(n, "", dtype=object)
    columns["embedding"] = np.where(columns["valid"][:, None], rng.normal(size=(n, DIM)), 0).astype(np.float16)
    cache_uri = f"{ds.uri}/features/{slug}"
    specs, metas = [], {}
    for index, lo in enumerate(range(0, n, rows_per_shard)):
        part = {k: v[lo: lo + rows_per_shard] for k, v in columns.items()}
        spec = cache.ShardSpec(index, lo, lo + len(part["row"]), f"digest-{index}")
        metas[index] = cache.shard_meta(spec, "fp", part)
        cache.write_shard(cache.shard_uri(cache_uri, spec), cache.shard_table(part, DIM, "float16", metas[index]))
        specs.append(spec)
    num_rows = {s: ds.num_rows(s) for s in ("train", "test", "label")}
    counts, rebuilt = cache.finish(dataset, slug, specs, metas, num_rows, DIM, "float16", {"name": slug}, "fp")
    assert rebuilt and counts["images"] == n and counts["failed"] == {"corrupt": int((~columns["valid"]).sum())}
    return {(s, int(r), int(k)): e.astype(np.float32) for s, r, k, e, ok in
            zip(columns["split"], columns["row"], columns["slot"], columns["embedding"], columns["valid"]) if ok}


def test_bank_returns_features_and_masks(dataset):
    expected = _write_cache(dataset, "model-a", rows_per_shard=7, seed=0)
    bank = FeatureBank.open(dataset)
    assert bank.dim == DIM and bank.slug == "model-a"
    for split in ("train", "test", "label"):
        rows = np.arange(bank.num_rows(split))[::-1]  # any order, duplicates allowed
        rows = np.concatenate([rows, rows[:2]])
        feats, mask = bank.get(split, rows)
        assert feats.shape == (len(rows), 3, DIM) and feats.dtype == torch.float32
        assert mask.shape == (len(rows), 3) and mask.dtype == torch.bool
        for i, row in enumerate(rows):
            for slot in range(3):
                vector = expected.get((split, int(row), slot))
                assert bool(mask[i, slot]) == (vector is not None)
                want = vector if vector is not None else np.zeros(DIM, dtype=np.float32)
                assert np.array_equal(feats[i, slot].numpy(), want)


def test_bank_is_memory_mapped_and_pickles_as_paths(dataset):
    _write_cache(dataset, "model-a", rows_per_shard=50, seed=1)
    bank = FeatureBank.open(dataset, "model-a")
    assert isinstance(bank._emb["train"], np.memmap)
    blob = pickle.dumps(bank)
    assert len(blob) < 1000  # the arrays are not in it
    clone = pickle.loads(blob)
    rows = np.arange(bank.num_rows("train"))
    assert torch.equal(clone.get("train", rows)[0], bank.get("train", rows)[0])


def test_choosing_among_caches_and_bad_requests(dataset):
    _write_cache(dataset, "model-a", rows_per_shard=50, seed=1)
    _write_cache(dataset, "model-b", rows_per_shard=50, seed=2)
    with pytest.raises(ValueError, match="2 feature caches"):
        FeatureBank.open(dataset)
    with pytest.raises(IncompatibleArtifactError, match="no feature cache 'model-c'"):
        FeatureBank.open(dataset, "model-c")
    bank = FeatureBank.open(dataset, "model-b")
    with pytest.raises(ValueError, match="unknown split"):
        bank.get("validation", np.arange(2))
    with pytest.raises(IndexError, match="out of range"):
        bank.get("test", np.array([bank.num_rows("test")]))
    feats, mask = bank.get("train", np.array([], dtype=np.int64))
    assert feats.shape == (0, 3, DIM) and mask.shape == (0, 3)


def test_unchanged_shards_do_not_rebuild_the_bank(dataset):
    _write_cache(dataset, "model-a", rows_per_shard=50, seed=1)
    ds = open_dataset(dataset)
    cache_uri = f"{ds.uri}/features/model-a"
    manifest = cache.read_manifest(cache_uri)
    specs = [cache.ShardSpec(i, lo, min(lo + 50, manifest["counts"]["images"]), f"digest-{i}")
             for i, lo in enumerate(range(0, manifest["counts"]["images"], 50))]
    metas = {s.index: cache.read_shard_meta(cache.shard_uri(cache_uri, s)) for s in specs}
    num_rows = {s: ds.num_rows(s) for s in ("train", "test", "label")}
    _, rebuilt = cache.finish(dataset, "model-a", specs, metas, num_rows, DIM, "float16", {}, "fp")
    assert not rebuilt
