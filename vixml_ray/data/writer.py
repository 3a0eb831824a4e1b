"""Writes the files of a dataset directory (layout in :mod:`vixml_ray.data.schema`) into a staging directory.

Parquet files are streamed batch by batch (one row group per batch); the manifest is written last and carries the
counts, a SHA-256 per output file and a content hash over all of them (sorted relative paths and file hashes), so
a reader can check that a dataset is the one a run was made on.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vixml_ray import storage
from vixml_ray.config import Config, save_config
from vixml_ray.data import schema

_HASH_BLOCK = 1 << 22


class ParquetSink:
    """A streaming parquet file of a fixed schema that counts its rows (and label pairs for item files)."""

    def __init__(self, uri: str, file_schema: pa.Schema, ordered_rows: bool = False):
        fs, path = storage.filesystem(uri)
        self.schema = file_schema
        self.ordered_rows = ordered_rows  # the ``row`` column must count 0, 1, ... across batches
        self.rows = 0
        self.pairs = 0
        self._writer = pq.ParquetWriter(path, file_schema, filesystem=fs, compression="zstd")

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.schema != self.schema:
            batch = batch.cast(self.schema)
        if batch.num_rows == 0:
            return
        if self.ordered_rows and batch.column("row")[0].as_py() != self.rows:
            raise ValueError(f"rows must be written in order: expected row {self.rows}, "
                             f"got {batch.column('row')[0].as_py()}")
        if "labels" in batch.schema.names:
            self.pairs += int(pc.sum(pc.list_value_length(batch.column("labels"))).as_py() or 0)
        self.rows += batch.num_rows
        self._writer.write(batch)

    def close(self) -> None:
        self._writer.close()


def file_sha256(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def hash_files(root: str, exclude: Iterable[str] = (schema.MANIFEST, schema.CONFIG)) -> tuple[dict[str, str], str]:
    """SHA-256 per top-level entry of ``root`` (a folder's is one hash over its files' relative paths and hashes,
    keyed ``"<folder>/"``), skipping ``exclude``; and one content hash over all entries."""
    fs, base = storage.filesystem(root)
    skip = set(exclude)
    files: dict[str, str] = {}
    folders: dict[str, Any] = {}  # "<folder>/" -> running sha256 over (path in folder, file hash), sorted
    for info in sorted(fs.get_file_info(pafs.FileSelector(base, recursive=True)), key=lambda i: i.path):
        rel = info.path[len(base.rstrip("/")) + 1:]
        if info.type != pafs.FileType.File or rel in skip:
            continue
        top, _, rest = rel.partition("/")
        file_hash = file_sha256(storage.join(root, rel))
        if rest:
            folders.setdefault(f"{top}/", hashlib.sha256()).update(f"{rest}\0{file_hash}\n".encode())
        else:
            files[rel] = file_hash
    files.update({name: digest.hexdigest() for name, digest in folders.items()})
    total = hashlib.sha256()
    for rel in sorted(files):
        total.update(f"{rel}\0{files[rel]}\n".encode())
    return files, total.hexdigest()


def filters_table(pairs: np.ndarray) -> pa.Table:
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return pa.table({"row": pairs[:, 0], "label": pairs[:, 1].astype(np.int32)}, schema=schema.FILTERS_SCHEMA)


class DatasetWriter:
    """Opens the split files of one staging directory; :meth:`finish` writes filters, images, config, manifest."""

    def __init__(self, staging: str):
        self.root = staging
        self.splits = {
            "train": ParquetSink(self.path(schema.SPLIT_FILES["train"]), schema.ITEMS_SCHEMA, ordered_rows=True),
            "test": ParquetSink(self.path(schema.SPLIT_FILES["test"]), schema.ITEMS_SCHEMA, ordered_rows=True),
            "label": ParquetSink(self.path(schema.SPLIT_FILES["label"]), schema.LABELS_SCHEMA, ordered_rows=True),
        }
        self.images = ParquetSink(self.path(schema.IMAGES_FILE), schema.IMAGES_SCHEMA)

    def path(self, rel: str) -> str:
        return storage.join(self.root, rel)

    def counts(self) -> dict[str, int]:
        return {
            "train": self.splits["train"].rows,
            "test": self.splits["test"].rows,
            "labels": self.splits["label"].rows,
            "train_pairs": self.splits["train"].pairs,
            "test_pairs": self.splits["test"].pairs,
            "images": self.images.rows,
        }

    def close(self) -> None:
        for sink in (*self.splits.values(), self.images):
            sink.close()

    def finish(self, cfg: Config, filter_pairs: np.ndarray, info: dict[str, Any],
               extra_counts: Optional[dict[str, int]] = None) -> dict[str, Any]:
        """Closes the files, writes filters, config and the manifest; returns the manifest."""
        self.close()
        filters = ParquetSink(self.path(schema.FILTERS_FILE), schema.FILTERS_SCHEMA)
        filters.write(filters_table(filter_pairs))
        filters.close()
        save_config(cfg, self.path(schema.CONFIG))
        files, content_hash = hash_files(self.root)
        counts = {**self.counts(), "filters": int(len(filter_pairs)), **(extra_counts or {})}
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            **info,
            "counts": counts,
            "num_labels": counts["labels"],
            "files": files,
            "content_hash": content_hash,
            "features": {},
        }
        storage.write_json(self.path(schema.MANIFEST), manifest)
        return manifest
