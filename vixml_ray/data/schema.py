"""The dataset directory layout and its parquet schemas (the index version's are in :mod:`vixml_ray.index.schema`, the
evaluation's predictions in :mod:`vixml_ray.eval.evaluate`).

A prepared dataset directory (published atomically, see :mod:`vixml_ray.storage`)::

    manifest.json          counts, schema version, source, content hash, feature caches
    config.yaml            the resolved config of the run that wrote it
    train.parquet          ITEMS_SCHEMA: training items (row = position, 0..n-1)
    test.parquet           ITEMS_SCHEMA: test items
    labels.parquet         LABELS_SCHEMA: labels (row = label id used by target lists)
    filters.parquet        FILTERS_SCHEMA: (test row, label) pairs removed from predictions only
    images.parquet         IMAGES_SCHEMA: image manifest, one row per (split, entity row, slot)
    images/                image files of a synthetic dataset (real catalogues point at URIs instead)
    features/<model-slug>/ image feature cache of one vision model (written by embed_images)

Item/label ``row`` equals its position in the file; ``labels`` holds label rows (ids into ``labels.parquet``).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
SPLIT_FILES = {"train": "train.parquet", "test": "test.parquet", "label": "labels.parquet"}
FILTERS_FILE = "filters.parquet"
IMAGES_FILE = "images.parquet"
IMAGES_DIR = "images"
FEATURES_DIR = "features"

SPLITS = ("train", "test", "label")  # entity kinds that can carry images
MAX_IMAGES = 3  # image slots per entity

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("label_rels", pa.list_(pa.float32()), nullable=False),
    ]
)

LABELS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)

FILTERS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),  # test item row
        pa.field("label", pa.int32(), nullable=False),  # label row
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),  # one of SPLITS
        pa.field("row", pa.int64(), nullable=False),  # entity row in its split's file
        pa.field("uid", pa.string(), nullable=False),  # entity uid
        pa.field("slot", pa.int8(), nullable=False),  # 0..MAX_IMAGES-1
        pa.field("uri", pa.string(), nullable=False),  # path relative to the dataset dir, absolute path, or URI
    ]
)


def feature_schema(dim: int, dtype: str) -> pa.Schema:
    """Image feature cache shards: one row per manifest image; ``embedding`` is zeros where ``valid`` is false."""
    value_type = {"float16": pa.float16(), "float32": pa.float32()}[dtype]
    return pa.schema(
        [
            pa.field("split", pa.string(), nullable=False),
            pa.field("row", pa.int64(), nullable=False),
            pa.field("uid", pa.string(), nullable=False),
            pa.field("slot", pa.int8(), nullable=False),
            pa.field("valid", pa.bool_(), nullable=False),
            pa.field("reason", pa.string()),  # why an image is invalid (missing, empty, corrupt, ...); null if valid
            pa.field("embedding", pa.list_(value_type, dim), nullable=False),
        ]
    )
