"""Immutable, versioned label-embedding sets that the index serves: shards written in parallel, then one commit.

An index directory (local path or any ``pyarrow.fs`` URI)::

    CURRENT                          "versions/vN": the version served by default, written LAST (one small object)
    versions/vN/part-00000.parquet   label_embedding_schema(dim) shards; any split of the label rows
    versions/vN/queries/part-*.parquet  optional: query_embedding_schema(dim) shards of the training queries
                                     (retrieval-augmented inference); in the same version, so one swap covers both
    versions/vN/manifest.json        written by commit: counts, dim, files with their row ranges, identity

A version directory without ``manifest.json`` is uncommitted (a write in progress or interrupted) and is never
served; a committed version is never modified. Because the pointer is written after the manifest, a reader either
sees the old version or the complete new one (object stores have no atomic rename; a single small PUT is atomic).

Writers (e.g. a Ray Data label-refresh job)::

    writer = VersionWriter(index_dir)
    path = writer.new_version()                         # driver
    writer.write_shard(path, shard_id, rows, embs)      # any worker, any order; a retried shard overwrites
    writer.write_shard(path, shard_id, rows, embs, part=QUERIES)  # optional training-query shards
    manifest = writer.commit(path, {"checkpoint": ...}) # driver: validates, writes manifest, then CURRENT
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vixml_ray import storage
from vixml_ray.data.schema import SCHEMA_VERSION
from vixml_ray.errors import IncompatibleArtifactError, MissingPathError
from vixml_ray.index.schema import label_embedding_schema, query_embedding_schema

if TYPE_CHECKING:
    from vixml_ray.inference.export import Export

VERSIONS_DIR = "versions"
LABELS, QUERIES = "labels", "queries"  # the parts of a version: label vectors, training-query vectors (optional)
PARTS = (LABELS, QUERIES)
QUERIES_DIR = "queries"
MANIFEST = "manifest.json"
ROW_GROUP_ROWS = 65536  # row groups let a shard read only the label rows it serves
_VERSION_RE = re.compile(r"^v(\d+)$")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")


@dataclass(frozen=True)
class ShardFile:
    """One committed parquet shard: its name in the version directory and the label rows it holds."""

    file: str
    num_rows: int
    min_row: int
    max_row: int


@dataclass(frozen=True)
class QueryPart:
    """The training-query vectors of a version: train rows ``0..num_rows-1``, each once, in ``queries/``."""

    num_rows: int
    files: tuple[ShardFile, ...]


@dataclass(frozen=True)
class Manifest:
    """What a committed version holds: label rows ``0..num_labels-1``, each once, as ``dim``-d float32 vectors, and
    optionally (``queries``) the training queries' vectors in the same space."""

    version: str
    num_labels: int
    dim: int
    files: tuple[ShardFile, ...]
    identity: dict[str, Any] = field(default_factory=dict)  # who made it: checkpoint, dataset hash, ...
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    queries: QueryPart | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Manifest":
        queries = obj.get("queries")
        if queries is not None:
            queries = QueryPart(queries["num_rows"], tuple(ShardFile(**f) for f in queries["files"]))
        return cls(**{**obj, "files": tuple(ShardFile(**f) for f in obj["files"]), "queries": queries})

    def has_part(self, part: str) -> bool:
        """Whether the version holds ``part`` (labels always; training queries when refreshed for RAA)."""
        return _check_part(part) == LABELS or self.queries is not None

    def num_rows(self, part: str = LABELS) -> int:
        """Rows of ``part``: labels or training queries."""
        return self.num_labels if _check_part(part) == LABELS else self._queries().num_rows

    def part_files(self, part: str = LABELS) -> tuple[ShardFile, ...]:
        """The committed shards of ``part`` (names relative to :func:`part_dir`)."""
        return self.files if _check_part(part) == LABELS else self._queries().files

    def _queries(self) -> QueryPart:
        if self.queries is None:
            raise IncompatibleArtifactError(f"index version {self.version} holds no training-query embeddings "
                                            "(refreshed without 'infer.raa.enabled')")
        return self.queries


def _check_part(part: str) -> str:
    if part not in PARTS:
        raise ValueError(f"unknown index part {part!r} (parts: {', '.join(PARTS)})")
    return part


def part_dir(version_path: str, part: str) -> str:
    """Where a version directory keeps the shards of ``part``."""
    return version_path if _check_part(part) == LABELS else storage.join(version_path, QUERIES_DIR)


def version_dir(index_dir: str, version: str) -> str:
    if not _VERSION_RE.match(version):
        raise ValueError(f"invalid index version name {version!r} (expected 'v<N>', e.g. 'v3')")
    return storage.join(index_dir, VERSIONS_DIR, version)


def _listdir(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [info.base_name for info in fs.get_file_info(pafs.FileSelector(path, recursive=False))]


def list_versions(index_dir: str, committed_only: bool = True) -> list[str]:
    """Version names in ascending order (by default only those with a manifest)."""
    names = [n for n in _listdir(storage.join(index_dir, VERSIONS_DIR)) if _VERSION_RE.match(n)]
    if committed_only:
        names = [n for n in names if storage.exists(storage.join(version_dir(index_dir, n), MANIFEST))]
    return sorted(names, key=lambda n: int(n[1:]))


def current_version(index_dir: str) -> str | None:
    """The version ``CURRENT`` points at, or None before the first commit."""
    pointer = storage.join(index_dir, storage.CURRENT)
    if not storage.exists(pointer):
        return None
    target = storage.read_text(pointer).strip()
    prefix = f"{VERSIONS_DIR}/"
    if not target.startswith(prefix) or not _VERSION_RE.match(target[len(prefix):]):
        raise ValueError(f"{pointer}: malformed pointer {target!r} (expected '{prefix}v<N>')")
    return target[len(prefix):]


def set_current(index_dir: str, version: str) -> None:
    """Points ``CURRENT`` at a committed version (also how to roll back)."""
    read_manifest(index_dir, version)  # refuses uncommitted or missing versions
    storage.write_text(storage.join(index_dir, storage.CURRENT), f"{VERSIONS_DIR}/{version}\n")


def read_manifest(index_dir: str, version: str | None = None) -> Manifest:
    """The manifest of ``version`` (default: the current one)."""
    version = version or current_version(index_dir)
    if version is None:
        raise MissingPathError(storage.join(index_dir, storage.CURRENT),
                               f"{index_dir}: no committed index version (no {storage.CURRENT} pointer)")
    uri = storage.join(version_dir(index_dir, version), MANIFEST)
    if not storage.exists(uri):
        raise MissingPathError(uri, f"index version {version} of {index_dir} is not committed (no {MANIFEST})")
    return Manifest.from_json(storage.read_json(uri))


def read_rows(index_dir: str, manifest: Manifest, lo: int, hi: int, part: str = LABELS) -> np.ndarray:
    """The embeddings of rows ``[lo, hi)`` of ``part`` (label or training-query rows) as a C-contiguous
    (hi - lo, dim) float32 array."""
    total = manifest.num_rows(part)
    if not 0 <= lo <= hi <= total:
        raise ValueError(f"{part} row range [{lo}, {hi}) outside version {manifest.version} (0..{total})")
    out = np.empty((hi - lo, manifest.dim), dtype=np.float32)
    filled = 0
    base = part_dir(version_dir(index_dir, manifest.version), part)
    for shard in manifest.part_files(part):
        if shard.max_row < lo or shard.min_row >= hi:
            continue
        fs, path = storage.filesystem(storage.join(base, shard.file))
        table = pq.read_table(path, filesystem=fs, columns=["row", "embedding"],
                              filters=[("row", ">=", lo), ("row", "<", hi)])
        rows = table.column("row").to_numpy()
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        out[rows - lo] = vectors.reshape(len(rows), manifest.dim)
        filled += len(rows)
    if filled != hi - lo:  # commit checked each row occurs once, so only changed files get here
        raise ValueError(f"version {manifest.version} of {index_dir}: found {filled} of the {hi - lo} {part} rows "
                         f"[{lo}, {hi}); its files changed after commit")
    return out


class VersionWriter:
    """Writes a new immutable version: :meth:`new_version`, then :meth:`write_shard` (parallel), then :meth:`commit`."""

    def __init__(self, index_dir: str):
        self.index_dir = index_dir

    def new_version(self) -> str:
        """Claims the next version name and returns its directory (never reuses a name, even an uncommitted one)."""
        fs, _ = storage.filesystem(self.index_dir)
        names = list_versions(self.index_dir, committed_only=False)
        number = int(names[-1][1:]) + 1 if names else 1
        while True:
            path = version_dir(self.index_dir, f"v{number}")
            if isinstance(fs, pafs.LocalFileSystem):
                try:  # atomic claim on local disk; object stores rely on one refresh job at a time
                    os.makedirs(storage.filesystem(path)[1])
                    return path
                except FileExistsError:
                    number += 1
                    continue
            fs.create_dir(storage.filesystem(path)[1], recursive=True)
            return path

    def write_shard(self, path: str, shard_id: int, rows: np.ndarray, embeddings: np.ndarray,
                    part: str = LABELS) -> str:
        """Writes ``part-<shard_id>.parquet`` (``rows`` of ``part`` and their (n, dim) ``embeddings``) into an
        uncommitted version directory; returns the file's URI."""
        if storage.exists(storage.join(path, MANIFEST)):
            raise FileExistsError(f"{path} is committed; versions are immutable")
        rows = np.asarray(rows, dtype=np.int64)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or rows.shape != (embeddings.shape[0],):
            raise ValueError(f"shard {shard_id}: rows {rows.shape} and embeddings {embeddings.shape} must be "
                             "(n,) and (n, dim)")
        if not np.isfinite(embeddings).all():
            bad = rows[~np.isfinite(embeddings).all(axis=1)]
            raise ValueError(f"shard {shard_id}: non-finite embeddings for {part} rows {bad[:5].tolist()}")
        order = np.argsort(rows, kind="stable")
        dim = embeddings.shape[1]
        table = pa.Table.from_arrays(
            [pa.array(rows[order]),
             pa.FixedSizeListArray.from_arrays(pa.array(embeddings[order].reshape(-1)), dim)],
            schema=_PART_SCHEMA[part](dim),
        )
        uri = storage.join(part_dir(path, part), f"part-{shard_id:05d}.parquet")
        storage.write_parquet(uri, table, row_group_size=ROW_GROUP_ROWS)
        return uri

    def commit(self, path: str, identity: Mapping[str, Any] | None = None, make_current: bool = True) -> Manifest:
        """Checks that the label shards hold every label row ``0..n-1`` exactly once with one ``dim`` (and the
        training-query shards, if any, every train row ``0..m-1`` in the same ``dim``), writes the manifest, then
        (``make_current``) the ``CURRENT`` pointer. ``identity``: JSON-able facts about the producer."""
        version = path.rstrip("/").rsplit("/", 1)[-1]
        if path.rstrip("/") != version_dir(self.index_dir, version):
            raise ValueError(f"{path} is not a version directory of {self.index_dir}")
        if storage.exists(storage.join(path, MANIFEST)):
            raise FileExistsError(f"{path} is already committed; versions are immutable")
        labels = _scan_part(path, LABELS)
        if labels is None:
            raise ValueError(f"{path}: no part-*.parquet shards to commit")
        queries = _scan_part(path, QUERIES)
        if queries is not None and queries[0] != labels[0]:
            raise ValueError(f"{path}/{QUERIES_DIR}: dim {queries[0]} differs from the label shards' {labels[0]}")
        dim, label_shards, num_labels = labels
        manifest = Manifest(
            version=version,
            num_labels=num_labels,
            dim=dim,
            files=label_shards,
            identity=dict(identity or {}),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            queries=QueryPart(queries[2], queries[1]) if queries is not None else None,
        )
        storage.write_json(storage.join(path, MANIFEST), manifest.to_json())
        if make_current:
            set_current(self.index_dir, version)
        return manifest


_PART_SCHEMA = {LABELS: label_embedding_schema, QUERIES: query_embedding_schema}


def _scan_part(path: str, part: str) -> tuple[int, tuple[ShardFile, ...], int] | None:
    """(dim, shards, rows) of the shards of ``part`` in an uncommitted version, or None when it has none; raises
    unless they hold rows ``0..n-1`` exactly once with one schema and dim."""
    where = part_dir(path, part)
    files = sorted(n for n in _listdir(where) if _PART_RE.match(n))
    if not files:
        return None
    dim, shards, all_rows = None, [], []
    for name in files:
        fs, file_path = storage.filesystem(storage.join(where, name))
        schema = pq.read_schema(file_path, filesystem=fs)
        file_dim = schema.field("embedding").type.list_size if "embedding" in schema.names else -1
        if file_dim < 1 or not schema.equals(_PART_SCHEMA[part](file_dim)):
            raise ValueError(f"{where}/{name}: schema {schema} is not {_PART_SCHEMA[part].__name__}(dim)")
        if dim is not None and file_dim != dim:
            raise ValueError(f"{where}/{name}: dim {file_dim} differs from the other shards' {dim}")
        dim = file_dim
        rows = pq.read_table(file_path, filesystem=fs, columns=["row"]).column("row").to_numpy()
        if len(rows):
            shards.append(ShardFile(name, len(rows), int(rows.min()), int(rows.max())))
            all_rows.append(rows)
    rows = np.sort(np.concatenate(all_rows)) if all_rows else np.zeros(0, dtype=np.int64)
    if len(rows) == 0:
        raise ValueError(f"{where}: the shards hold no {part} rows")
    if not np.array_equal(rows, np.arange(len(rows))):
        dup = rows[1:][rows[1:] == rows[:-1]]
        missing = np.setdiff1d(np.arange(rows[-1] + 1), rows)
        raise ValueError(f"{where}: {part} rows must be 0..n-1 exactly once; duplicated {dup[:5].tolist()}, "
                         f"missing {missing[:5].tolist()}, negative {rows[rows < 0][:5].tolist()}")
    return int(dim), tuple(shards), len(rows)


def check_embedded_by(manifest: Manifest, export: Export, index_dir: str) -> None:
    """Raises unless the version's labels were embedded by ``export`` (queries and labels share one space)."""
    made_by = manifest.identity.get("export") or {}
    if made_by.get("fingerprint") != export.fingerprint:
        raise IncompatibleArtifactError(f"index version {manifest.version} of {index_dir} was embedded by the "
                                        f"export {made_by.get('uri')!r}, not by {export.uri} (fingerprints differ); "
                                        "refresh the index with jobs/refresh_labels.py --checkpoint for this export")
