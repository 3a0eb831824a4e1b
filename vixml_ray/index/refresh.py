"""Label refresh: embed every label with a trained export into a new immutable index version, then make it current.

With ``infer.raa.enabled`` the same version also gets the embeddings of every TRAINING query (the memory of
retrieval-augmented inference, :mod:`vixml_ray.index.raa`), so one commit and one ``CURRENT`` swap cover both.
Each part (labels; training queries) goes through three steps, joined by the driver's per-row table (row, uid,
content hash):

1. hash (driver, streamed): a content hash per row over its text and its image features (mask + vectors, from
   the memory-mapped feature bank), so a row whose text or images changed gets a new hash;
2. plan (driver): a full refresh embeds every row; ``incremental`` carries a row over from the current version
   when that version was embedded by the same export (fingerprint) and holds the row with the same hash (labels
   are matched by uid, training queries by row and uid); a base version without training queries has none to carry;
3. embed + write (Ray Data): changed rows through the :class:`~vixml_ray.inference.batch.BatchEmbedder` actor pool,
   carried rows read from the base version's parquet parts and renumbered, both into ``part-*.parquet`` shards
   of ``infer.rows_per_part`` rows written by tasks through :class:`~vixml_ray.index.versions.VersionWriter`
   (labels first, then training queries: one actor pool at a time).

Before the commit the version directory also gets its side tables (:mod:`vixml_ray.index.tables`:
``labels.parquet``, and ``queries.parquet`` with each training query's label rows) and the resolved ``config.yaml``.
The commit writes the manifest (export, dataset, feature cache, counts) and then ``CURRENT``: an interrupted refresh
leaves an uncommitted directory that is never served, and the current version keeps serving.
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
import ray

from vixml_ray import storage
from vixml_ray.config import Config, save_config
from vixml_ray.data.dataset import Dataset, open_dataset
from vixml_ray.errors import InputError
from vixml_ray.index.tables import (
    LABELS_FILE,
    QUERIES_FILE,
    has_table,
    read_labels,
    read_queries,
    write_labels,
    write_queries,
)
from vixml_ray.index.versions import (
    LABELS,
    QUERIES,
    Manifest,
    VersionWriter,
    current_version,
    part_dir,
    read_manifest,
    version_dir,
)
from vixml_ray.ray_utils import init_ray_for
from vixml_ray.inference.batch import embed_split
from vixml_ray.inference.export import Export, FeatureCache, absolute_uri, feature_cache, read_export

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
SPLIT_OF = {LABELS: "label", QUERIES: "train"}  # the dataset split each index part embeds
TABLE_OF = {LABELS: LABELS_FILE, QUERIES: QUERIES_FILE}


# ------------------------------------------------------------------------------------------------------- hashing
def content_hashes(cfg: Config, dataset: Dataset, split: str, features: FeatureCache | None,
                   keep_text: bool = True) -> pa.Table:
    """(row, uid, text, content_hash) of every row of ``split`` in row order (without ``text`` unless
    ``keep_text``: the side table of training queries holds no texts, and a million of them need not sit in the
    driver); the hash is the hex BLAKE2b-128 of the text, the image mask and the image features (streamed from the
    split's file and the memory-mapped feature bank)."""
    bank = None
    if features is not None:
        from vixml_ray.vision.bank import FeatureBank

        bank = FeatureBank.open(dataset.uri, features.slug)
    parts = []
    for batch in dataset.iter_batches(split, ["row", "uid", "text"], batch_rows=cfg.infer.rows_per_batch):
        rows = batch.column("row").to_numpy()
        images = [b""] * len(rows)
        if bank is not None:
            feats, mask = (t.numpy() for t in bank.get(split, rows))
            images = [m.tobytes() + f.tobytes() for m, f in zip(mask, feats)]
        hashes = [hashlib.blake2b(t.encode("utf-8") + b"\0" + i, digest_size=16).hexdigest()
                  for t, i in zip(batch.column("text").to_pylist(), images)]
        table = pa.Table.from_batches([batch]).append_column("content_hash", pa.array(hashes, pa.string()))
        parts.append(table if keep_text else table.drop_columns(["text"]))
    if not parts:
        raise InputError(dataset.file_uri(split), None, "no rows to embed")
    table = pa.concat_tables(parts).combine_chunks()
    del parts  # the chunks' buffers go now, not when the refresh ends
    if not np.array_equal(table.column("row").to_numpy(), np.arange(dataset.num_rows(split))):
        raise InputError(dataset.file_uri(split), None, f"rows must be 0..{dataset.num_rows(split) - 1} in order")
    return table


# -------------------------------------------------------------------------------------------------------- plan
@dataclass
class RefreshPlan:
    """Which rows of one index part to embed and which to carry over from ``base``."""

    part: str  # LABELS or QUERIES
    embed: np.ndarray  # bool [rows]
    source: np.ndarray  # object [rows]: the version that embedded a carried row, None where embedded now
    old_to_new: np.ndarray | None = None  # int64 [base rows]: new row of a carried base row, -1 if not carried
    base: Manifest | None = None
    reason: str = ""  # why rows are (re-)embedded

    @property
    def carried(self) -> int:
        return int((~self.embed).sum())

    def summary(self) -> dict[str, Any]:
        return {"embedded": int(self.embed.sum()), "carried": self.carried, "reason": self.reason}


def _unique_uids(uids: pa.ChunkedArray | pa.Array, where: str) -> None:
    counts = pc.value_counts(uids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise InputError(where, None, f"incremental refresh matches labels by uid, but uids repeat: "
                                      f"{dup.to_pylist()[:5]}")


def _base(index_dir: str, export: Export, part: str) -> tuple[Manifest | None, str]:
    """The current version if its ``part`` can be carried over (same export, rows and hashes present), else why
    not."""
    base_version = current_version(index_dir)
    if base_version is None:
        return None, "incremental: no current version"
    base = read_manifest(index_dir, base_version)
    if base.identity.get("export", {}).get("fingerprint") != export.fingerprint:
        return None, f"incremental: {base_version} was embedded by another export"
    if not base.has_part(part):
        return None, f"incremental: {base_version} holds no {part}"
    if not has_table(index_dir, base_version, TABLE_OF[part]):
        return None, f"incremental: {base_version} has no {TABLE_OF[part]} (content hashes)"
    return base, ""


def _matches(index_dir: str, base: Manifest, table: pa.Table, part: str) -> tuple[np.ndarray, pa.Table]:
    """Per row of ``table``: the position of its counterpart in the base version's side table (-1: none), and that
    table. Labels match by uid (catalogues reorder); training queries by row and uid (uids need not be unique)."""
    columns = ["row", "uid", "content_hash", "source_version"]
    if part == LABELS:
        old = read_labels(index_dir, base.version, columns)
        _unique_uids(table.column("uid"), "dataset labels")
        _unique_uids(old.column("uid"), f"index version {base.version}")
        return pc.index_in(table.column("uid"), value_set=old.column("uid")).fill_null(-1).to_numpy(), old
    old = read_queries(index_dir, base.version, columns)
    rows = table.column("row").to_numpy()
    pos = np.where(rows < old.num_rows, rows, -1)
    has = np.flatnonzero(pos >= 0)
    same_uid = pc.equal(table.column("uid").take(pa.array(has)), old.column("uid").take(pa.array(pos[has])))
    pos[has[~same_uid.to_numpy(zero_copy_only=False)]] = -1
    return pos, old


def plan_refresh(index_dir: str, export: Export, table: pa.Table, incremental: bool, part: str = LABELS
                 ) -> RefreshPlan:
    """Full: embed every row of ``part``. Incremental: carry the rows whose counterpart in the current version has
    the same content hash, if that version was embedded by this very export and holds the part (otherwise embed
    everything, saying why)."""
    n = table.num_rows
    full = RefreshPlan(part, np.ones(n, dtype=bool), np.full(n, None, dtype=object))
    if not incremental:
        full.reason = "full refresh"
        return full
    base, full.reason = _base(index_dir, export, part)
    if base is None:
        return full
    pos, old = _matches(index_dir, base, table, part)
    found = np.flatnonzero(pos >= 0)
    old_hash = old.column("content_hash").take(pa.array(pos[found]))
    same = found[pc.equal(old_hash, table.column("content_hash").take(pa.array(found))).to_numpy(
        zero_copy_only=False)]
    old_to_new = np.full(base.num_rows(part), -1, dtype=np.int64)
    old_to_new[old.column("row").to_numpy()[pos[same]]] = same
    embed = np.ones(n, dtype=bool)
    embed[same] = False
    source = np.full(n, None, dtype=object)
    source[same] = np.asarray(old.column("source_version").to_pylist(), dtype=object)[pos[same]]
    return RefreshPlan(part, embed, source, old_to_new, base,
                       f"incremental over {base.version}: new or changed {part}")


# ------------------------------------------------------------------------------------------------------ writing
def _carry_batch(batch: pa.Table, old_to_new: np.ndarray) -> dict[str, np.ndarray]:
    """Base-version rows -> their new rows (dropping rows that are not carried), embeddings unchanged."""
    new = old_to_new[batch.column("row").to_numpy()]
    keep = new >= 0
    values = batch.column("embedding").combine_chunks()
    vectors = values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), values.type.list_size)
    return {"row": new[keep], "embedding": np.ascontiguousarray(vectors[keep], dtype=np.float32)}


def _write_part(batch: dict[str, np.ndarray], index_dir: str, path: str, part: str) -> dict[str, np.ndarray]:
    """Writes one ``part-<first row>.parquet`` (rows are disjoint, so the name is unique); returns its row count."""
    rows = np.asarray(batch["row"], dtype=np.int64)
    first = int(rows.min())
    VersionWriter(index_dir).write_shard(path, first, rows, np.asarray(batch["embedding"]), part=part)
    return {"part": np.array([first]), "rows": np.array([len(rows)])}


def _pipeline(cfg: Config, export: Export, dataset: Dataset, features: FeatureCache | None, plan: RefreshPlan,
              index_dir: str, path: str) -> ray.data.Dataset:
    sources = []
    if plan.embed.any():
        sources.append(embed_split(cfg, export, dataset, SPLIT_OF[plan.part], features,
                                   keep=None if plan.embed.all() else plan.embed))
    if plan.base is not None and plan.carried:
        base_dir = part_dir(version_dir(index_dir, plan.base.version), plan.part)
        fs, _ = storage.filesystem(base_dir)
        files = [storage.filesystem(storage.join(base_dir, f.file))[1] for f in plan.base.part_files(plan.part)]
        sources.append(ray.data.read_parquet(files, filesystem=fs).map_batches(
            _carry_batch, fn_kwargs={"old_to_new": plan.old_to_new}, batch_format="pyarrow"))
    merged = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
    return merged.map_batches(_write_part, fn_kwargs={"index_dir": index_dir, "path": path, "part": plan.part},
                              batch_size=cfg.infer.rows_per_part, batch_format="numpy")


def _embed_part(cfg: Config, export: Export, dataset: Dataset, features: FeatureCache | None, plan: RefreshPlan,
                index_dir: str, path: str) -> tuple[int, float]:
    """Runs one part's pipeline to the end; (parquet parts written, seconds)."""
    started = time.perf_counter()
    parts = _pipeline(cfg, export, dataset, features, plan, index_dir, path).take_all()
    written = sum(int(p["rows"]) for p in parts)
    if written != len(plan.embed):
        raise RuntimeError(f"{path}: wrote {written} {plan.part} rows for {len(plan.embed)}")
    return len(parts), time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------------- job
def refresh_labels(export_uri: str, dataset_uri: str, index_dir: str, cfg: Config | None = None,
                   incremental: bool = False) -> dict[str, Any]:
    """Embeds the dataset's labels (and, with ``infer.raa.enabled``, its training queries) with the export into a
    new version of ``index_dir`` and makes it current.

    ``cfg``: the job config (default: the export's; see :func:`vixml_ray.inference.export.job_config`). Returns the
    summary (labels, embedded, carried, labels_per_s, queries, version, out, ...).
    """
    started = time.perf_counter()
    export = read_export(export_uri)
    cfg = cfg or export.cfg
    index_dir = absolute_uri(index_dir)  # Ray workers write the parts: no path relative to the driver's directory
    init_ray_for(cfg)
    dataset = open_dataset(absolute_uri(dataset_uri))
    export.check_labels(dataset)
    features = feature_cache(cfg, export, dataset)
    tables = {LABELS: content_hashes(cfg, dataset, "label", features)}
    if cfg.infer.raa.enabled:
        tables[QUERIES] = content_hashes(cfg, dataset, "train", features, keep_text=False)
    plans = {part: plan_refresh(index_dir, export, table, incremental, part) for part, table in tables.items()}
    for plan in plans.values():
        log.info("refresh %s: %d rows, %d to embed, %d carried (%s)", plan.part, len(plan.embed),
                 int(plan.embed.sum()), plan.carried, plan.reason)

    writer = VersionWriter(index_dir)
    path = writer.new_version()
    version = path.rstrip("/").rsplit("/", 1)[-1]
    try:
        runs = {part: _embed_part(cfg, export, dataset, features, plan, index_dir, path)
                for part, plan in plans.items()}
        write_labels(path, tables[LABELS], plans[LABELS].source, version)
        if QUERIES in plans:
            write_queries(path, tables[QUERIES], dataset.table("train", ["labels"]).column("labels"),
                          plans[QUERIES].source, version)
        save_config(cfg, storage.join(path, CONFIG_FILE))
        labels = plans[LABELS]
        identity = {
            "export": export.identity(),
            "dataset": {"uri": dataset.uri, "content_hash": dataset.manifest.get("content_hash")},
            "features": features.identity() if features is not None else None,
            "refresh": {"mode": "incremental" if incremental else "full",
                        "base_version": labels.base.version if labels.base is not None else None,
                        **labels.summary()},
        }
        if QUERIES in plans:
            identity["queries"] = {"split": "train", **plans[QUERIES].summary()}
        manifest = writer.commit(path, identity)
    except BaseException:
        with contextlib.suppress(Exception):  # never served (no manifest); removing it just tidies up
            storage.remove(path)
        raise
    parts, pipeline_s = runs[LABELS]
    embedded = int(plans[LABELS].embed.sum())
    queries = None
    if QUERIES in plans:
        queries = {"rows": manifest.num_rows(QUERIES), **plans[QUERIES].summary(), "parts": runs[QUERIES][0],
                   "pipeline_s": round(runs[QUERIES][1], 3)}
    return {
        "labels": manifest.num_labels, "embedded": embedded, "carried": plans[LABELS].carried, "dim": manifest.dim,
        "parts": parts, "labels_per_s": round(manifest.num_labels / pipeline_s, 2),
        "embedded_per_s": round(embedded / pipeline_s, 2), "pipeline_s": round(pipeline_s, 3),
        "queries": queries, "seconds": round(time.perf_counter() - started, 2), "version": version,
        "out": index_dir, "mode": "incremental" if incremental else "full", "reason": plans[LABELS].reason,
    }
