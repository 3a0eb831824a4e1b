"""Label refresh: embed every label with a trained export into a new immutable index version, then make it current.

Three steps, joined by the driver's per-label table (row, uid, text, content hash):

1. hash (driver, streamed): a content hash per label over its text and its image features (mask + vectors, from
   the memory-mapped feature bank), so a label whose text or images changed gets a new hash;
2. plan (driver): a full refresh embeds every label; ``incremental`` carries a label over from the current version
   when that version was embedded by the same export (fingerprint) and holds a label with the same uid and hash;
3. embed + write (Ray Data): changed labels through the :class:`~vixml_ray.serve.batch.BatchEmbedder` actor pool,
   carried labels read from the base version's parquet parts and renumbered, both into ``part-*.parquet`` shards
   of ``infer.rows_per_part`` rows written by tasks through :class:`~vixml_ray.index.versions.VersionWriter`.

Before the commit the version directory also gets ``labels.parquet`` (:data:`LABELS_FILE`: row, uid, text,
content_hash, source_version = the version that embedded the label; names for the predictor, hashes for the next
incremental refresh) and the resolved ``config.yaml``. The commit writes the manifest (export, dataset, feature
cache, counts) and then ``CURRENT``: an interrupted refresh leaves an uncommitted directory that is never served,
and the current version keeps serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from vixml_ray import storage
from vixml_ray.config import Config, save_config
from vixml_ray.data.dataset import Dataset, open_dataset
from vixml_ray.data.schema import INDEX_LABELS_SCHEMA
from vixml_ray.index.versions import (
    Manifest,
    VersionWriter,
    current_version,
    read_manifest,
    version_dir,
)
from vixml_ray.ray_utils import init_ray
from vixml_ray.serve.batch import embed_split
from vixml_ray.serve.export import Export, FeatureCache, absolute_uri, feature_cache, read_export

log = logging.getLogger(__name__)

LABELS_FILE = "labels.parquet"
CONFIG_FILE = "config.yaml"


# ------------------------------------------------------------------------------------------------------- hashing
def label_hashes(cfg: Config, dataset: Dataset, features: FeatureCache | None) -> pa.Table:
    """(row, uid, text, content_hash) of every label in row order; the hash is the hex BLAKE2b-128 of the text, the
    image mask and the image features (streamed from the labels file and the memory-mapped feature bank)."""
    bank = None
    if features is not None:
        from vixml_ray.vision.bank import FeatureBank

        bank = FeatureBank.open(dataset.uri, features.slug)
    parts = []
    for batch in dataset.iter_batches("label", ["row", "uid", "text"], batch_rows=cfg.infer.rows_per_batch):
        rows = batch.column("row").to_numpy()
        images = [b""] * len(rows)
        if bank is not None:
            feats, mask = (t.numpy() for t in bank.get("label", rows))
            images = [m.tobytes() + f.tobytes() for m, f in zip(mask, feats)]
        hashes = [hashlib.blake2b(t.encode("utf-8") + b"\0" + i, digest_size=16).hexdigest()
                  for t, i in zip(batch.column("text").to_pylist(), images)]
        parts.append(pa.Table.from_batches([batch]).append_column("content_hash", pa.array(hashes, pa.string())))
    if not parts:
        raise ValueError(f"{dataset.file_uri('label')}: no labels to embed")
    table = pa.concat_tables(parts).combine_chunks()
    if not np.array_equal(table.column("row").to_numpy(), np.arange(dataset.num_labels)):
        raise ValueError(f"{dataset.file_uri('label')}: label rows must be 0..{dataset.num_labels - 1} in order")
    return table


# -------------------------------------------------------------------------------------------------------- plan
@dataclass
class RefreshPlan:
    """Which labels to embed and which to carry over from ``base``."""

    embed: np.ndarray  # bool [num_labels]
    source: np.ndarray  # object [num_labels]: the version that embedded a carried label, None where embedded now
    old_to_new: np.ndarray | None = None  # int64 [base labels]: new row of a carried base row, -1 if not carried
    base: Manifest | None = None
    reason: str = ""  # why labels are (re-)embedded

    @property
    def carried(self) -> int:
        return int((~self.embed).sum())


def read_labels(index_dir: str, version: str, columns: list[str] | None = None) -> pa.Table:
    """The ``labels.parquet`` of a version written by :func:`refresh_labels` (sorted by row)."""
    uri = storage.join(version_dir(index_dir, version), LABELS_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"index version {version} of {index_dir} has no {LABELS_FILE} (not written by "
                                "refresh_labels)")
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def check_embedded_by(manifest: Manifest, export: Export, index_dir: str) -> None:
    """Raises unless the version's labels were embedded by ``export`` (queries and labels share one space)."""
    made_by = manifest.identity.get("export") or {}
    if made_by.get("fingerprint") != export.fingerprint:
        raise ValueError(f"index version {manifest.version} of {index_dir} was embedded by the export "
                         f"{made_by.get('uri')!r}, not by {export.uri} (fingerprints differ); refresh the index "
                         "with jobs/refresh_labels.py --checkpoint for this export")


def _unique_uids(uids: pa.ChunkedArray | pa.Array, where: str) -> None:
    counts = pc.value_counts(uids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise ValueError(f"{where}: incremental refresh matches labels by uid, but uids repeat: "
                         f"{dup.to_pylist()[:5]}")


def plan_refresh(index_dir: str, export: Export, labels: pa.Table, incremental: bool) -> RefreshPlan:
    """Full: embed everything. Incremental: carry labels whose uid and content hash the current version holds, if
    that version was embedded by this very export (otherwise embed everything, saying why)."""
    n = labels.num_rows
    full = RefreshPlan(np.ones(n, dtype=bool), np.full(n, None, dtype=object))
    if not incremental:
        full.reason = "full refresh"
        return full
    base_version = current_version(index_dir)
    if base_version is None:
        full.reason = "incremental: no current version"
        return full
    base = read_manifest(index_dir, base_version)
    if base.identity.get("export", {}).get("fingerprint") != export.fingerprint:
        full.reason = f"incremental: {base_version} was embedded by another export"
        return full
    if not storage.exists(storage.join(version_dir(index_dir, base_version), LABELS_FILE)):
        full.reason = f"incremental: {base_version} has no {LABELS_FILE} (content hashes)"
        return full
    old = read_labels(index_dir, base_version, ["row", "uid", "content_hash", "source_version"])
    _unique_uids(labels.column("uid"), "dataset labels")
    _unique_uids(old.column("uid"), f"index version {base_version}")
    pos = pc.index_in(labels.column("uid"), value_set=old.column("uid")).fill_null(-1).to_numpy()
    found = np.flatnonzero(pos >= 0)
    old_hash = old.column("content_hash").take(pa.array(pos[found]))
    same = found[pc.equal(old_hash, labels.column("content_hash").take(pa.array(found))).to_numpy(
        zero_copy_only=False)]
    old_rows = old.column("row").to_numpy()[pos[same]]
    old_to_new = np.full(base.num_labels, -1, dtype=np.int64)
    old_to_new[old_rows] = same
    embed = np.ones(n, dtype=bool)
    embed[same] = False
    source = np.full(n, None, dtype=object)
    source[same] = np.asarray(old.column("source_version").to_pylist(), dtype=object)[pos[same]]
    return RefreshPlan(embed, source, old_to_new, base, f"incremental over {base_version}: new or changed labels")


# ------------------------------------------------------------------------------------------------------ writing
def _carry_batch(batch: pa.Table, old_to_new: np.ndarray) -> dict[str, np.ndarray]:
    """Base-version rows -> their new rows (dropping labels that are not carried), embeddings unchanged."""
    new = old_to_new[batch.column("row").to_numpy()]
    keep = new >= 0
    values = batch.column("embedding").combine_chunks()
    vectors = values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), values.type.list_size)
    return {"row": new[keep], "embedding": np.ascontiguousarray(vectors[keep], dtype=np.float32)}


def _write_part(batch: dict[str, np.ndarray], index_dir: str, path: str) -> dict[str, np.ndarray]:
    """Writes one ``part-<first row>.parquet`` (rows are disjoint, so the name is unique); returns its row count."""
    rows = np.asarray(batch["row"], dtype=np.int64)
    part = int(rows.min())
    VersionWriter(index_dir).write_shard(path, part, rows, np.asarray(batch["embedding"]))
    return {"part": np.array([part]), "rows": np.array([len(rows)])}


def _pipeline(cfg: Config, export: Export, dataset: Dataset, features: FeatureCache | None, plan: RefreshPlan,
              index_dir: str, path: str) -> ray.data.Dataset:
    sources = []
    if plan.embed.any():
        sources.append(embed_split(cfg, export, dataset, "label", features,
                                   keep=None if plan.embed.all() else plan.embed))
    if plan.base is not None and plan.carried:
        base_dir = version_dir(index_dir, plan.base.version)
        fs, _ = storage.filesystem(base_dir)
        files = [storage.filesystem(storage.join(base_dir, f.file))[1] for f in plan.base.files]
        sources.append(ray.data.read_parquet(files, filesystem=fs).map_batches(
            _carry_batch, fn_kwargs={"old_to_new": plan.old_to_new}, batch_format="pyarrow"))
    merged = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
    return merged.map_batches(_write_part, fn_kwargs={"index_dir": index_dir, "path": path},
                              batch_size=cfg.infer.rows_per_part, batch_format="numpy")


def _write_labels(path: str, labels: pa.Table, source: np.ndarray, version: str) -> None:
    """The version's ``labels.parquet``: a label embedded now has ``source_version`` = this version."""
    table = pa.table({
        "row": labels.column("row"), "uid": labels.column("uid"), "text": labels.column("text"),
        "content_hash": labels.column("content_hash"),
        "source_version": pa.array([version if s is None else s for s in source], pa.string()),
    }, schema=INDEX_LABELS_SCHEMA)
    fs, file_path = storage.filesystem(storage.join(path, LABELS_FILE))
    pq.write_table(table, file_path, filesystem=fs)


# ---------------------------------------------------------------------------------------------------------- job
def refresh_labels(export_uri: str, dataset_uri: str, index_dir: str, cfg: Config | None = None,
                   incremental: bool = False) -> dict[str, Any]:
    """Embeds the dataset's labels with the export into a new version of ``index_dir`` and makes it current.

    ``cfg``: the job config (default: the export's; see :func:`vixml_ray.serve.export.job_config`). Returns the
    summary (labels, embedded, carried, labels_per_s, version, out, ...).
    """
    started = time.perf_counter()
    export = read_export(export_uri)
    cfg = cfg or export.cfg
    index_dir = absolute_uri(index_dir)  # Ray workers write the parts: no path relative to the driver's directory
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.object_store_memory)
    dataset = open_dataset(absolute_uri(dataset_uri))
    features = feature_cache(cfg, export, dataset)
    labels = label_hashes(cfg, dataset, features)
    plan = plan_refresh(index_dir, export, labels, incremental)
    log.info("refresh: %d labels, %d to embed, %d carried (%s)", labels.num_rows, int(plan.embed.sum()),
             plan.carried, plan.reason)

    writer = VersionWriter(index_dir)
    path = writer.new_version()
    version = path.rstrip("/").rsplit("/", 1)[-1]
    try:
        t0 = time.perf_counter()
        parts = _pipeline(cfg, export, dataset, features, plan, index_dir, path).take_all()
        pipeline_s = time.perf_counter() - t0
        written = sum(int(p["rows"]) for p in parts)
        if written != labels.num_rows:
            raise RuntimeError(f"{path}: wrote {written} label rows for {labels.num_rows} labels")
        _write_labels(path, labels, plan.source, version)
        save_config(cfg, storage.join(path, CONFIG_FILE))
        embedded = int(plan.embed.sum())
        manifest = writer.commit(path, {
            "export": export.identity(),
            "dataset": {"uri": dataset.uri, "content_hash": dataset.manifest.get("content_hash")},
            "features": features.identity() if features is not None else None,
            "refresh": {"mode": "incremental" if incremental else "full",
                        "base_version": plan.base.version if plan.base is not None else None,
                        "embedded": embedded, "carried": plan.carried, "reason": plan.reason},
        })
    except BaseException:
        with contextlib.suppress(Exception):  # never served (no manifest); removing it just tidies up
            storage.remove(path)
        raise
    return {
        "labels": manifest.num_labels, "embedded": embedded, "carried": plan.carried, "dim": manifest.dim,
        "parts": len(parts), "labels_per_s": round(manifest.num_labels / pipeline_s, 2),
        "embedded_per_s": round(embedded / pipeline_s, 2), "pipeline_s": round(pipeline_s, 3),
        "seconds": round(time.perf_counter() - started, 2), "version": version, "out": index_dir,
        "mode": "incremental" if incremental else "full", "reason": plan.reason,
    }
