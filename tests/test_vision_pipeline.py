"""The Ray Data embedding pipeline end to end on the synthetic dataset with the tiny tower: bad images counted, not
fatal; HTTP images fetched; features read back through the FeatureBank; a resumed run embeds only what is missing."""

from __future__ import annotations

import io
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vixml_ray.config import Config, load_config
from vixml_ray.data import schema
from vixml_ray.data.dataset import open_dataset
from vixml_ray.data.synthetic import generate_synthetic
from vixml_ray.errors import ConfigError
from vixml_ray.vision import cache
from vixml_ray.vision.bank import FeatureBank
from vixml_ray.vision.decode import decode_rgb
from vixml_ray.vision.pipeline import embed_images
from vixml_ray.vision.tiny import TINY_OPEN_CLIP, TINY_OPEN_CLIP_NAME
from vixml_ray.vision.towers import load_preprocessor, load_tower

def test_decode_and_embed_stages_cannot_be_fused():
    """Ray Data fuses map stages with equal resources: decoding would then run inside the embedding actors."""
    with pytest.raises(ConfigError, match="fuses stages with equal resources"):
        load_config(None, ["vision.decode_num_cpus=1", "vision.num_cpus_per_actor=1"])
    load_config(None, ["vision.decode_num_cpus=1", "vision.num_cpus_per_actor=1", "vision.num_gpus_per_actor=1"])


def _config(tmp_path: Path, *overrides: str) -> Config:
    cfg = load_config(None, [
        f"cache_dir={tmp_path / 'cache'}", f"vision.model_name={TINY_OPEN_CLIP_NAME}", "vision.rows_per_shard=16",
        "vision.batch_size=8", "vision.decode_batch_size=4", "vision.decode_num_cpus=0.5", *overrides])
    cfg.vision.model_config = dict(TINY_OPEN_CLIP)
    return cfg


def _dataset(tmp_path: Path, num_train: int, num_test: int) -> str:
    cfg = load_config(None, [f"data.synthetic.num_train={num_train}", f"data.synthetic.num_test={num_test}",
                             "data.synthetic.num_topics=2", "data.synthetic.seed=3"])
    out = str(tmp_path / "ds")
    generate_synthetic(out, cfg)
    return out


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def http_root():
    """Serves a directory over HTTP on 127.0.0.1 (set ``state['dir']`` before use)."""
    state: dict = {}

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=state["dir"], **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["base"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.mark.slow
def test_pipeline_counts_bad_images_and_fills_the_bank(ray_session, tmp_path, http_root):
    root = _dataset(tmp_path, num_train=24, num_test=6)
    ds = open_dataset(root)
    manifest = ds.image_manifest().to_pylist()
    present = [m for m in manifest if os.path.exists(ds.image_uri(m["uri"]))]
    missing = len(manifest) - len(present)
    photo = Image.open(ds.image_uri(present[0]["uri"])).convert("RGB")
    jpeg = _encode(photo, "JPEG")
    damage = {present[1]["uri"]: b"", present[2]["uri"]: jpeg[: len(jpeg) // 2],
              present[3]["uri"]: _encode(photo.convert("CMYK"), "JPEG"),
              present[4]["uri"]: _encode(photo.convert("RGBA"), "PNG")}
    for uri, data in damage.items():
        Path(ds.image_uri(uri)).write_bytes(data)
    http_root["dir"] = ds.uri  # two images come over HTTP
    for m in present[5:7]:
        m["uri"] = f"{http_root['base']}/{m['uri']}"
    pq.write_table(pa.Table.from_pylist(manifest, schema=schema.IMAGES_SCHEMA), f"{ds.uri}/{schema.IMAGES_FILE}")

    cfg = _config(tmp_path, "vision.cache_dtype=float32")
    summary = embed_images(cfg, root, progress=False)
    assert summary["failed"] == {"empty": 1, "missing": missing, "truncated": 1}
    assert summary["converted"] == {"CMYK": 1, "RGBA": 1}
    assert summary["images"] == len(manifest) and summary["valid"] == len(manifest) - missing - 2
    assert summary["embedded"] == summary["valid"] and summary["shards"] == -(-len(manifest) // 16)
    assert any(Path(tmp_path / "cache" / "downloads").rglob("*")), "HTTP bytes were not cached"

    # the bank holds, for every (entity, slot), what the tower gives for that image in this process
    tower, preprocess = load_tower(cfg.vision), load_preprocessor(cfg.vision)
    bank = FeatureBank.open(root)
    assert bank.dim == TINY_OPEN_CLIP["embed_dim"]
    by_entity = {}
    for m in manifest:
        by_entity.setdefault((m["split"], m["row"]), {})[m["slot"]] = m["uri"]
    for split in schema.SPLITS:
        rows = np.arange(ds.num_rows(split))
        feats, mask = bank.get(split, rows)
        for row in rows:
            for slot in range(3):
                uri = by_entity.get((split, int(row)), {}).get(slot)
                data = None
                if uri is not None and not uri.startswith("http"):
                    data = Path(ds.image_uri(uri)).read_bytes() if os.path.exists(ds.image_uri(uri)) else None
                elif uri is not None:
                    data = Path(ds.image_uri(uri.split("/", 3)[3])).read_bytes()
                image = decode_rgb(data).image if data is not None else None
                assert bool(mask[row, slot]) == (image is not None), (split, row, slot, uri)
                if image is not None:
                    want = tower.embed(preprocess([image]))[0]
                    np.testing.assert_allclose(feats[row, slot].numpy(), want, rtol=1e-4, atol=1e-5)
                else:
                    assert not feats[row, slot].any()


@pytest.mark.slow
def test_resumed_run_embeds_only_missing_shards(ray_session, tmp_path):
    root = _dataset(tmp_path, num_train=20, num_test=4)
    cfg = _config(tmp_path)
    first = embed_images(cfg, root, progress=False)
    assert first["shards"] >= 4 and first["shards_skipped"] == 0
    cache_uri = first["features"]
    bank = FeatureBank.open(root)
    before = {split: bank.get(split, np.arange(bank.num_rows(split))) for split in schema.SPLITS}
    shards = sorted(Path(cache_uri, cache.SHARDS_DIR).glob("part-*.parquet"))
    assert len(shards) == first["shards"]
    valid_in = [sum(pq.read_table(p, columns=["valid"]).column("valid").to_pylist()) for p in shards]
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}

    # a run killed half way: one shard never written, one cut off mid-file, no bank and no cache manifest yet
    shards[1].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:300])
    shutil.rmtree(Path(cache_uri, cache.BANK_DIR))
    Path(cache_uri, cache.CACHE_MANIFEST).unlink()
    second = embed_images(cfg, root, progress=False)
    assert second["shards_skipped"] == first["shards"] - 2
    assert second["embedded"] == valid_in[1] + valid_in[2]  # the images the model saw this time
    assert second["bank_rebuilt"] and second["valid"] == first["valid"]
    untouched = {p.name: p.stat().st_mtime_ns for p in shards if p not in (shards[1], shards[2])}
    assert untouched == {k: v for k, v in stamps.items() if k in untouched}
    bank = FeatureBank.open(root)
    for split, (feats, mask) in before.items():
        again = bank.get(split, np.arange(bank.num_rows(split)))
        assert torch.equal(again[0], feats) and torch.equal(again[1], mask)

    third = embed_images(cfg, root, progress=False)  # nothing left to do: no Ray work, no bank rebuild
    assert third["embedded"] == 0 and third["shards_skipped"] == first["shards"] and not third["bank_rebuilt"]
    assert "pipeline_s" not in third
