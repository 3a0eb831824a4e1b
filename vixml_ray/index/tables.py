"""The side tables of an index version written by :mod:`vixml_ray.index.refresh`, next to its vectors.

* ``labels.parquet`` (:data:`~vixml_ray.index.schema.INDEX_LABELS_SCHEMA`): names for the predictor, content hashes
  for the next incremental refresh, the version that embedded each label;
* ``queries.parquet`` (:data:`~vixml_ray.index.schema.INDEX_QUERIES_SCHEMA`, only with ``infer.raa.enabled``): the
  training queries' label rows (the votes of retrieval-augmented inference), content hashes and source versions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from vixml_ray import storage
from vixml_ray.errors import IncompatibleArtifactError
from vixml_ray.index.schema import INDEX_LABELS_SCHEMA, INDEX_QUERIES_SCHEMA
from vixml_ray.index.versions import Manifest, version_dir

LABELS_FILE = "labels.parquet"
QUERIES_FILE = "queries.parquet"


def has_table(index_dir: str, version: str, name: str) -> bool:
    return storage.exists(storage.join(version_dir(index_dir, version), name))


def _read(index_dir: str, version: str, name: str, columns: list[str] | None) -> pa.Table:
    uri = storage.join(version_dir(index_dir, version), name)
    if not storage.exists(uri):
        hint = " with 'infer.raa.enabled'=true" if name == QUERIES_FILE else ""
        raise IncompatibleArtifactError(f"index version {version} of {index_dir} has no {name} (not written by "
                                        f"refresh_labels{hint})")
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_labels(index_dir: str, version: str, columns: list[str] | None = None) -> pa.Table:
    """The ``labels.parquet`` of a version (sorted by row)."""
    return _read(index_dir, version, LABELS_FILE, columns)


def read_queries(index_dir: str, version: str, columns: list[str] | None = None) -> pa.Table:
    """The ``queries.parquet`` of a version (sorted by train row)."""
    return _read(index_dir, version, QUERIES_FILE, columns)


def train_label_matrix(index_dir: str, manifest: Manifest) -> sp.csr_matrix:
    """The binary (training queries x labels) matrix ``y`` of a version's ``queries.parquet``, float64 CSR."""
    lists = read_queries(index_dir, manifest.version, ["labels"]).column("labels").combine_chunks()
    num_queries = manifest.num_rows("queries")
    if len(lists) != num_queries:
        raise IncompatibleArtifactError(f"index version {manifest.version} of {index_dir}: {QUERIES_FILE} has "
                                        f"{len(lists)} rows, the manifest {num_queries} training queries")
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = pc.list_flatten(lists).to_numpy().astype(np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= manifest.num_labels):
        raise IncompatibleArtifactError(f"index version {manifest.version} of {index_dir}: {QUERIES_FILE} names "
                                        f"labels outside 0..{manifest.num_labels - 1}")
    matrix = sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(num_queries, manifest.num_labels))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # a label listed twice still votes once
    return matrix


def _sources(source: np.ndarray, version: str) -> pa.Array:
    return pa.array([version if s is None else s for s in source], pa.string())


def _write(path: str, name: str, table: pa.Table) -> None:
    storage.write_parquet(storage.join(path, name), table)


def write_labels(path: str, labels: pa.Table, source: np.ndarray, version: str) -> None:
    """``labels.parquet`` of the uncommitted version at ``path`` from the (row, uid, text, content_hash) table; a
    label embedded now (``source`` None) has ``source_version`` = this version."""
    _write(path, LABELS_FILE, pa.table({
        "row": labels.column("row"), "uid": labels.column("uid"), "text": labels.column("text"),
        "content_hash": labels.column("content_hash"), "source_version": _sources(source, version),
    }, schema=INDEX_LABELS_SCHEMA))


def write_queries(path: str, queries: pa.Table, label_lists: pa.ChunkedArray | pa.Array, source: np.ndarray,
                  version: str) -> None:
    """``queries.parquet`` of the uncommitted version at ``path`` from the (row, uid, content_hash) table of the
    training queries and their label lists."""
    _write(path, QUERIES_FILE, pa.table({
        "row": queries.column("row"), "uid": queries.column("uid"), "content_hash": queries.column("content_hash"),
        "source_version": _sources(source, version), "labels": label_lists,
    }, schema=INDEX_QUERIES_SCHEMA))
