"""Parquet schemas of an index version (``<index>/versions/vN/``, see :mod:`vixml_ray.index.versions`)."""

from __future__ import annotations

import pyarrow as pa


def label_embedding_schema(dim: int) -> pa.Schema:
    """Label embedding shards of one index version (``<index>/versions/vN/part-*.parquet``, see
    :mod:`vixml_ray.index.versions`): one row per label, ``row`` = label id in ``labels.parquet``."""
    return pa.schema(
        [
            pa.field("row", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


# ``<index>/versions/vN/labels.parquet`` (written by :mod:`vixml_ray.index.refresh`): the labels a version holds, by
# row: names for the predictor, content hashes for the next incremental refresh, the version that embedded each.
INDEX_LABELS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),  # hex BLAKE2b-128 of text, image mask and features
        pa.field("source_version", pa.string(), nullable=False),
    ]
)


def query_embedding_schema(dim: int) -> pa.Schema:
    """Training-query embedding shards of an index version (``<index>/versions/vN/queries/part-*.parquet``, written
    when ``infer.raa.enabled``): one row per training item, ``row`` = item row in ``train.parquet``. The same layout
    as :func:`label_embedding_schema`, so one shard reader serves both."""
    return label_embedding_schema(dim)


# ``<index>/versions/vN/queries.parquet`` (written by :mod:`vixml_ray.index.refresh` with ``infer.raa.enabled``): the
# training queries a version holds, by row: their label rows (the votes of retrieval-augmented inference), content
# hashes for the next incremental refresh, the version that embedded each.
INDEX_QUERIES_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),  # train item row
        pa.field("uid", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),  # hex BLAKE2b-128 of text, image mask and features
        pa.field("source_version", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),  # label rows of the item (binary votes)
    ]
)
