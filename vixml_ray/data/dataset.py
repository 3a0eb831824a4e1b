"""Reading a prepared dataset directory back: the API every later stage uses.

``open_dataset(uri)`` follows a published output's pointer (:func:`vixml_ray.storage.resolve`), checks the schema
version and gives typed access to items, labels, filters and the image manifest. ``register_features`` records an
image feature cache in the manifest's ``features`` map (called by the image embedding job).
"""

from __future__ import annotations

import hashlib

import contextlib
import os
import re
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from vixml_ray import storage
from vixml_ray.config import DataConfig
from vixml_ray.data import schema
from vixml_ray.errors import IncompatibleArtifactError, MissingPathError

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def split_validation(num_rows: int, fraction: float, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_rows, val_rows), both sorted: ``min(max_rows, round(fraction * num_rows))`` rows drawn
    without replacement by ``numpy.random.default_rng(seed)``."""
    n_val = min(int(max_rows), int(round(fraction * num_rows)))
    all_rows = np.arange(num_rows, dtype=np.int64)
    if n_val <= 0:
        return all_rows, np.empty(0, dtype=np.int64)
    val = np.sort(np.random.default_rng(seed).choice(num_rows, size=n_val, replace=False).astype(np.int64))
    keep = np.ones(num_rows, dtype=bool)
    keep[val] = False
    return all_rows[keep], val


class Dataset:
    """A prepared dataset directory (read-only)."""

    def __init__(self, uri: str):
        self.uri = storage.resolve(uri)
        manifest_uri = storage.join(self.uri, schema.MANIFEST)
        if not storage.exists(manifest_uri):
            raise MissingPathError(uri, f"not a prepared dataset (no {schema.MANIFEST}): {uri}")
        self.manifest: dict[str, Any] = storage.read_json(manifest_uri)
        version = self.manifest.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            raise IncompatibleArtifactError(f"{manifest_uri}: schema version {version}, this code reads "
                                            f"{schema.SCHEMA_VERSION}; prepare the dataset again")

    def __repr__(self) -> str:
        return f"Dataset({self.uri!r}, train={self.num_train}, test={self.num_test}, labels={self.num_labels})"

    @property
    def num_labels(self) -> int:
        return int(self.manifest["counts"]["labels"])

    @property
    def num_train(self) -> int:
        return int(self.manifest["counts"]["train"])

    @property
    def num_test(self) -> int:
        return int(self.manifest["counts"]["test"])

    def num_rows(self, split: str) -> int:
        return int(self.manifest["counts"]["labels" if split == "label" else _check_split(split)])

    def file_uri(self, split: str) -> str:
        """URI of a split's parquet file (``train``, ``test`` or ``label``), e.g. for ``ray.data.read_parquet``."""
        return storage.join(self.uri, schema.SPLIT_FILES[_check_split(split)])

    def _read(self, rel: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
        fs, path = storage.filesystem(storage.join(self.uri, rel))
        return pq.read_table(path, columns=list(columns) if columns is not None else None, filesystem=fs)

    def table(self, split: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """A split's parquet table (``ITEMS_SCHEMA`` for train/test, ``LABELS_SCHEMA`` for label)."""
        return self._read(schema.SPLIT_FILES[_check_split(split)], columns)

    def iter_batches(self, split: str, columns: Optional[Sequence[str]] = None,
                     batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
        """Streams a split in record batches (rows in order)."""
        fs, path = storage.filesystem(self.file_uri(split))
        with fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows,
                                                      columns=list(columns) if columns is not None else None)

    def sample_rows(self, split: str, size: Optional[int] = None, seed: int = 0) -> np.ndarray:
        """Sorted rows of ``split``: all (``size`` None or at least the row count), or a uniform sample of ``size``
        rows without replacement drawn with ``seed`` (``eval.sample_size``/``eval.sample_seed``)."""
        n = self.num_rows(split)
        if size is None or size >= n:
            return np.arange(n, dtype=np.int64)
        return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)

    def texts(self, split: str) -> list[str]:
        return self.table(split, ["text"]).column("text").to_pylist()

    def uids(self, split: str) -> list[str]:
        return self.table(split, ["uid"]).column("uid").to_pylist()

    def label_catalogue(self) -> str:
        """SHA-256 of the label uids in row order: models with per-label state (prototypes) are tied to it."""
        digest = hashlib.sha256()
        for uid in self.uids("label"):
            digest.update(uid.encode("utf-8") + b"\n")
        return digest.hexdigest()

    def label_matrix(self, split: str, rows: Optional[np.ndarray] = None) -> sp.csr_matrix:
        """Ground truth as CSR [rows x num_labels] (values = ``target_rel``) of ``train`` or ``test``, optionally
        restricted to ``rows`` (in that order)."""
        table = self.table(_labelled_split(split, "label_matrix"), ["labels", "label_rels"])
        matrix = _label_rows(table.column("labels").combine_chunks(), table.column("label_rels").combine_chunks(),
                             self.num_labels)
        return matrix[np.asarray(rows)] if rows is not None else matrix

    def label_counts(self, split: str) -> np.ndarray:
        """int64 [num_labels]: how many rows of ``train`` or ``test`` carry each label (a non-zero relevance, a
        repeated label once), streamed in record batches: the split's label matrix is never held whole."""
        counts = np.zeros(self.num_labels, dtype=np.int64)
        for batch in self.iter_batches(_labelled_split(split, "label_counts"), ["labels", "label_rels"]):
            rows = _label_rows(batch.column(0), batch.column(1), self.num_labels).copy()  # arrow memory is read-only
            rows.sum_duplicates()
            rows.eliminate_zeros()
            counts += np.bincount(rows.indices, minlength=self.num_labels)
        return counts

    def filter_pairs(self) -> np.ndarray:
        """(test row, label) pairs to remove from predictions, int64 [n, 2] sorted."""
        table = self._read(schema.FILTERS_FILE)
        return np.stack([table.column("row").to_numpy(), table.column("label").to_numpy().astype(np.int64)],
                        axis=1).reshape(-1, 2)

    def image_manifest(self) -> pa.Table:
        """``IMAGES_SCHEMA`` rows; a relative ``uri`` is relative to the dataset directory (see :meth:`image_uri`)."""
        return self._read(schema.IMAGES_FILE)

    def image_uri(self, uri: str) -> str:
        """An image manifest ``uri`` as an absolute path or URI."""
        if "://" in uri or uri.startswith("/"):
            return uri
        return storage.join(self.uri, uri)

    def validation_rows(self, data: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The deterministic (train_rows, val_rows) split of TRAIN (see :func:`split_validation`)."""
        return split_validation(self.num_train, data.validation_fraction, data.max_validation, seed)

    def features(self) -> dict[str, Any]:
        """The manifest's feature caches: model slug -> info (as registered)."""
        return dict(self.manifest.get("features", {}))


def open_dataset(uri: str) -> Dataset:
    return Dataset(uri)


def _check_split(split: str) -> str:
    if split not in schema.SPLIT_FILES:
        raise ValueError(f"unknown split {split!r} (splits: {', '.join(schema.SPLIT_FILES)})")
    return split


def _labelled_split(split: str, caller: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"{caller} needs split 'train' or 'test', got {split!r}")
    return split


@contextlib.contextmanager
def _manifest_lock(root: str) -> Iterator[None]:
    """An exclusive lock on a local dataset's manifest (object stores have no locks: last writer wins)."""
    if not storage.is_local(root):
        yield
        return
    import fcntl

    fd = os.open(os.path.join(storage.filesystem(root)[1], ".manifest.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def register_features(dataset_uri: str, model_slug: str, info: dict[str, Any]) -> dict[str, Any]:
    """Records ``info`` (JSON-serialisable) under ``features[model_slug]`` of the dataset's manifest.

    The read-modify-write holds a file lock on local disk and replaces the manifest in one rename, so readers see
    the old or the new manifest, never a partial one; returns the updated manifest.
    """
    if not _SLUG.match(model_slug):
        raise ValueError(f"invalid feature model slug {model_slug!r} (letters, digits, '.', '_', '-')")
    root = storage.resolve(dataset_uri)
    manifest_uri = storage.join(root, schema.MANIFEST)
    if not storage.exists(manifest_uri):
        raise MissingPathError(dataset_uri, f"not a prepared dataset (no {schema.MANIFEST}): {dataset_uri}")
    with _manifest_lock(root):
        manifest = storage.read_json(manifest_uri)
        manifest.setdefault("features", {})[model_slug] = dict(info)
        storage.write_json(manifest_uri, manifest)
    return manifest


def _label_rows(lists: pa.ListArray, rels: pa.ListArray, num_labels: int) -> sp.csr_matrix:
    """CSR [len(lists) x num_labels] of the ``labels``/``label_rels`` list columns (values = relevances)."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return sp.csr_matrix((pc.list_flatten(rels).to_numpy(), pc.list_flatten(lists).to_numpy(), indptr),
                         shape=(len(lengths), num_labels))
