"""Shared builders of the inference tests (refresh, evaluate, predict): a tiny image model's export, a synthetic
dataset with an image feature cache, and single-process reference embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from vixml_ray.config import Config, load_config
from vixml_ray.data import schema
from vixml_ray.data.dataset import open_dataset
from vixml_ray.data.synthetic import generate_synthetic
from vixml_ray.model import array_images, build_embedder, embed_arrays, load_export, tokenize
from vixml_ray.vision import cache
from vixml_ray.vision.bank import FeatureBank
from vixml_ray.vision.tiny import TINY_OPEN_CLIP, TINY_OPEN_CLIP_NAME
from vixml_ray.vision.towers import feature_slug, model_info

IMAGE_DIM = TINY_OPEN_CLIP["embed_dim"]
SPLIT_IDS = {"train": 0, "test": 1, "label": 2}


def inference_config(tmp_path: Path, *overrides: str) -> Config:
    """tiny:bert with images from the tiny open_clip tower; small Ray Data batches and parts; 30 labels."""
    cfg = load_config(None, [
        f"cache_dir={tmp_path / 'cache'}", "model.name_or_path=tiny:bert", "model.use_images=true",
        "model.max_length=16", f"vision.model_name={TINY_OPEN_CLIP_NAME}", "vision.batch_size=64",
        "vision.decode_batch_size=32", "vision.decode_num_cpus=0.5", "data.synthetic.num_topics=10",
        "data.synthetic.num_attributes=3", "data.synthetic.num_train=60", "data.synthetic.num_test=24",
        "infer.batch_size=8", "infer.rows_per_batch=16", "infer.rows_per_part=7", "index.num_shards=2",
        "index.cpus_per_shard=0", "eval.topk=10", *overrides])
    cfg.vision.model_config = dict(TINY_OPEN_CLIP)
    return cfg


def make_dataset(out: Path, cfg: Config, label_texts: dict[int, str] | None = None) -> str:
    """The synthetic dataset of ``cfg``, with the texts of some labels replaced (a changed catalogue)."""
    generate_synthetic(str(out), cfg)
    if label_texts:
        path = out / schema.SPLIT_FILES["label"]
        table = pq.read_table(path)
        texts = table.column("text").to_pylist()
        for row, text in label_texts.items():
            texts[row] = text
        pq.write_table(table.set_column(2, "text", [texts]).cast(schema.LABELS_SCHEMA), path)
    return str(out)


def write_random_features(dataset: str, cfg: Config, salted_label_rows: tuple[int, ...] = ()) -> None:
    """A feature cache of the export's tower slug holding seeded random vectors (every 7th image invalid): one
    vector per (split, row, slot), different for the label rows in ``salted_label_rows`` (changed images)."""
    ds = open_dataset(dataset)
    manifest = ds.image_manifest()
    n = manifest.num_rows
    columns = {k: np.asarray(manifest.column(k).to_pylist(), dtype=object if k in ("split", "uid") else None)
               for k in ("split", "row", "uid", "slot")}
    columns["valid"] = np.arange(n) % 7 != 3
    columns["reason"] = np.where(columns["valid"], "", "corrupt").astype(object)
    columns["converted"] = np.full(n, "", dtype=object)
    vectors = np.zeros((n, IMAGE_DIM), dtype=np.float32)
    for i, (split, row, slot) in enumerate(zip(columns["split"], columns["row"], columns["slot"])):
        salt = int(split == "label" and row in salted_label_rows)
        vectors[i] = np.random.default_rng([SPLIT_IDS[split], int(row), int(slot), salt]).normal(size=IMAGE_DIM)
    columns["embedding"] = (vectors * columns["valid"][:, None]).astype(np.float16)
    slug = feature_slug(cfg.vision)
    spec = cache.ShardSpec(0, 0, n, "random")
    meta = cache.shard_meta(spec, "random", columns)
    cache_uri = f"{ds.uri}/{schema.FEATURES_DIR}/{slug}"
    cache.write_shard(cache.shard_uri(cache_uri, spec), cache.shard_table(columns, IMAGE_DIM, "float16", meta))
    cache.finish(ds.uri, slug, [spec], {0: meta}, {s: ds.num_rows(s) for s in schema.SPLITS}, IMAGE_DIM, "float16",
                 model_info(cfg.vision, IMAGE_DIM), "random")


def make_export(out: Path, cfg: Config, seed: int = 0) -> str:
    """A random-weight tiny embedder of ``cfg`` published as an inference export."""
    torch.manual_seed(seed)
    build_embedder(cfg, IMAGE_DIM if cfg.model.use_images else None).save_export(str(out))
    return str(out)


def evaluated_setup(tmp: Path, cfg: Config) -> tuple[str, str, str]:
    """(dataset, export, index) under ``tmp``: a dataset whose features come from the real embedding pipeline, a
    random export, its label index, and its evaluation in ``tmp / "eval"`` (needs Ray)."""
    from vixml_ray.eval.evaluate import evaluate
    from vixml_ray.index.refresh import refresh_labels
    from vixml_ray.vision.pipeline import embed_images

    dataset = make_dataset(tmp / "ds", cfg)
    embed_images(cfg, dataset, progress=False)
    export = make_export(tmp / "export", cfg)
    index = str(tmp / "index")
    refresh_labels(export, dataset, index)
    evaluate(export, dataset, str(tmp / "eval"), index_dir=index)
    return dataset, export, index


def reference_embeddings(export: str, dataset: str, split: str) -> np.ndarray:
    """Every row of ``split`` embedded in this process, in row order (the refresh and evaluation must agree)."""
    embedder = load_export(export)
    ds = open_dataset(dataset)
    tokens = tokenize(embedder.tokenizer, ds.texts(split), embedder.cfg.model.max_length)
    feats = mask = None
    if embedder.use_images:
        bank = FeatureBank.open(dataset, feature_slug(embedder.cfg.vision))
        feats, mask = (t.numpy() for t in bank.get(split, np.arange(ds.num_rows(split))))
    return embed_arrays(embedder, tokens, array_images(feats, mask), batch_size=5)
