"""The image feature cache of one vision model, ``<dataset>/features/<slug>/``::

    shards/part-000000.parquet   feature_schema rows of input shard 0 (manifest rows [0, rows_per_shard)), ...
    bank/                        published atomically once every shard is verified (read by FeatureBank):
      <split>_index.npy            int64 [N, 3]: row of each (entity, slot) in <split>_emb.npy, -1 = no image
      <split>_emb.npy              [n_valid, D] pooled embeddings (cache dtype) of that split's valid images
    config.yaml                  the resolved config of the last run
    manifest.json                model, dim, dtype, counts, shard digest; written last

A shard is complete when its file exists, its footer carries the metadata it was written with (shard index, row
count, digest of its input rows, model fingerprint) and these match the current input and model; anything else
(absent, half-written, stale) is recomputed. Shards are written with :func:`vixml_ray.storage.write_parquet`, so a
killed run leaves no half-written shard under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vixml_ray import storage
from vixml_ray.data import schema
from vixml_ray.data.dataset import register_features

SHARDS_DIR = "shards"
BANK_DIR = "bank"
CACHE_MANIFEST = "manifest.json"
CACHE_CONFIG = "config.yaml"
META_KEY = b"vixml.feature_shard"
KEY_COLUMNS = ("split", "row", "slot", "uri")


@dataclass(frozen=True)
class ShardSpec:
    """One input shard: manifest rows ``[start, stop)`` and the digest of their keys and URIs."""

    index: int
    start: int
    stop: int
    digest: str

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}.parquet"


def input_digest(table: pa.Table) -> str:
    """SHA-256 over the (split, row, slot, uri) of a shard's manifest rows, in order."""
    digest = hashlib.sha256()
    columns = [table.column(c).to_pylist() for c in KEY_COLUMNS]
    for split, row, slot, uri in zip(*columns):
        digest.update(f"{split}\t{row}\t{slot}\t{uri}\n".encode("utf-8"))
    return digest.hexdigest()


def shard_uri(cache_uri: str, spec: ShardSpec) -> str:
    return storage.join(cache_uri, SHARDS_DIR, spec.name)


def read_shard_meta(uri: str) -> Optional[dict[str, Any]]:
    """The metadata a shard was written with, or None when the file is absent or not a readable shard."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else None


def complete_shard_meta(cache_uri: str, spec: ShardSpec, fingerprint: str) -> Optional[dict[str, Any]]:
    """The metadata of ``spec``'s output shard when it is complete and current, else None."""
    meta = read_shard_meta(shard_uri(cache_uri, spec))
    ok = (meta is not None and meta.get("index") == spec.index and meta.get("rows") == spec.rows
          and meta.get("input_digest") == spec.digest and meta.get("model_fingerprint") == fingerprint)
    return meta if ok else None


def shard_meta(spec: ShardSpec, fingerprint: str, columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """What a shard's footer records: its identity and its counts (valid per split, failed by reason, converted
    by source mode), so totals never need the shards' data."""
    valid = np.asarray(columns["valid"], dtype=bool)
    return {
        "index": spec.index, "start": spec.start, "stop": spec.stop, "rows": spec.rows,
        "input_digest": spec.digest, "model_fingerprint": fingerprint,
        "valid_per_split": dict(Counter(str(s) for s in columns["split"][valid])),
        "failed": dict(Counter(str(r) for r in columns["reason"] if r)),
        "converted": dict(Counter(str(c) for c in columns["converted"] if c)),
    }


def total_counts(metas: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Images, valid images (in total and per split), failures by reason and conversions by mode over shards."""
    images, per_split, failed, converted = 0, Counter(), Counter(), Counter()
    for meta in metas:
        images += meta["rows"]
        per_split.update(meta["valid_per_split"])
        failed.update(meta["failed"])
        converted.update(meta["converted"])
    return {"images": images, "valid": int(sum(per_split.values())), "valid_per_split": dict(sorted(per_split.items())),
            "failed": dict(sorted(failed.items())), "converted": dict(sorted(converted.items()))}


def shard_table(columns: dict[str, np.ndarray], dim: int, dtype: str, meta: dict[str, Any]) -> pa.Table:
    """A feature shard from column arrays (``embedding`` [n, dim]); ``meta`` goes into the footer."""
    emb = np.ascontiguousarray(columns["embedding"], dtype=np.dtype(dtype)).reshape(-1)
    reasons = [r if r else None for r in columns["reason"]]
    arrays = [
        pa.array(columns["split"], pa.string()),
        pa.array(columns["row"], pa.int64()),
        pa.array(columns["uid"], pa.string()),
        pa.array(columns["slot"], pa.int8()),
        pa.array(columns["valid"], pa.bool_()),
        pa.array(reasons, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(emb), dim),
    ]
    file_schema = schema.feature_schema(dim, dtype).with_metadata({META_KEY: json.dumps(meta, sort_keys=True)})
    return pa.Table.from_arrays(arrays, schema=file_schema)


def write_shard(uri: str, table: pa.Table) -> None:
    """Writes a shard so that it appears under its name complete or not at all."""
    storage.write_parquet(uri, table, compression="zstd")


def shards_digest(specs: Iterable[ShardSpec], fingerprint: str) -> str:
    """Identifies the complete set of shards a bank is built from."""
    digest = hashlib.sha256(fingerprint.encode("utf-8"))
    for spec in specs:
        digest.update(f"{spec.index}:{spec.rows}:{spec.digest}\n".encode("utf-8"))
    return digest.hexdigest()


def read_manifest(cache_uri: str) -> Optional[dict[str, Any]]:
    uri = storage.join(cache_uri, CACHE_MANIFEST)
    return storage.read_json(uri) if storage.exists(uri) else None


def finish(dataset_uri: str, slug: str, specs: list[ShardSpec], metas: dict[int, dict[str, Any]],
           num_rows: dict[str, int], dim: int, dtype: str, model: dict[str, Any], fingerprint: str,
           extra: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], bool]:
    """Once every shard is complete: rebuilds the bank if the set of shards changed (or the bank is gone), writes
    the cache manifest last and records the cache in the dataset manifest. Returns (counts, bank rebuilt)."""
    root = storage.resolve(dataset_uri)
    cache_uri = storage.join(root, schema.FEATURES_DIR, slug)
    counts = total_counts(metas[s.index] for s in specs)
    digest = shards_digest(specs, fingerprint)
    previous = read_manifest(cache_uri)
    rebuilt = (previous is None or previous.get("shards_digest") != digest
               or not storage.exists(storage.join(cache_uri, BANK_DIR)))
    if rebuilt:
        build_bank(cache_uri, specs, counts["valid_per_split"], num_rows, dim, dtype)
        storage.write_json(storage.join(cache_uri, CACHE_MANIFEST), {
            "slug": slug, "model": model, "dim": dim, "dtype": dtype, "num_shards": len(specs),
            "shards_digest": digest, "splits": num_rows, "counts": counts, "bank": BANK_DIR, **(extra or {}),
        })
    if rebuilt or slug not in (storage.read_json(storage.join(root, schema.MANIFEST)).get("features") or {}):
        register_features(dataset_uri, slug, {
            "path": f"{schema.FEATURES_DIR}/{slug}", "dim": dim, "dtype": dtype, "model": model,
            "images": counts["images"], "valid": counts["valid"],
        })
    return counts, rebuilt


# ------------------------------------------------------------------------------------------------------------ bank
def _read_columns(uri: str, columns: list[str]) -> pa.Table:
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def _embeddings(table: pa.Table, dim: int) -> np.ndarray:
    values = table.column("embedding").combine_chunks().flatten()
    return values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def build_bank(cache_uri: str, specs: list[ShardSpec], valid_per_split: dict[str, int], num_rows: dict[str, int],
               dim: int, dtype: str) -> None:
    """Consolidates the shards into the memory-mappable bank, published atomically (``valid_per_split`` sizes the
    embedding arrays: see :func:`total_counts`)."""
    unknown = set(valid_per_split) - set(num_rows)
    if unknown:
        raise ValueError(f"{cache_uri}: shards name unknown splits {sorted(unknown)} (splits: {sorted(num_rows)})")
    uris = [shard_uri(cache_uri, s) for s in specs]
    with storage.publish(storage.join(cache_uri, BANK_DIR), overwrite=True, local=True) as staging:
        _write_bank(staging, uris, num_rows, valid_per_split, dim, dtype)


def _write_bank(out_dir: str, uris: list[str], num_rows: dict[str, int], valid_per_split: dict[str, int], dim: int,
                dtype: str) -> None:
    """Pass 2 of :func:`build_bank`: scatters every shard's valid embeddings into the split arrays."""
    index = {s: np.lib.format.open_memmap(os.path.join(out_dir, f"{s}_index.npy"), mode="w+", dtype=np.int64,
                                          shape=(n, schema.MAX_IMAGES)) for s, n in num_rows.items()}
    emb = {s: np.lib.format.open_memmap(os.path.join(out_dir, f"{s}_emb.npy"), mode="w+", dtype=np.dtype(dtype),
                                        shape=(valid_per_split.get(s, 0), dim)) for s in num_rows}
    for arr in index.values():
        arr[:] = -1
    filled: Counter[str] = Counter()
    for uri in uris:
        t = _read_columns(uri, ["split", "row", "slot", "valid", "embedding"])
        valid = t.column("valid").to_numpy(zero_copy_only=False)
        if not valid.any():
            continue
        t = t.filter(pa.array(valid))
        rows = t.column("row").to_numpy()
        slots = t.column("slot").to_numpy().astype(np.int64)
        vectors = _embeddings(t, dim)
        for split in pc.unique(t.column("split")).to_pylist():
            sel = pc.equal(t.column("split"), split).to_numpy(zero_copy_only=False)
            r, s, n = rows[sel], slots[sel], int(sel.sum())
            if r.min() < 0 or r.max() >= num_rows[split] or s.min() < 0 or s.max() >= schema.MAX_IMAGES:
                raise ValueError(f"{uri}: {split} row/slot out of range (rows 0..{num_rows[split] - 1}, "
                                 f"slots 0..{schema.MAX_IMAGES - 1})")
            if filled[split] + n > len(emb[split]):
                raise ValueError(f"{uri}: more valid {split} images than the shard footers count; delete the cache "
                                 "and embed again")
            emb[split][filled[split]: filled[split] + n] = vectors[sel]
            index[split][r, s] = np.arange(filled[split], filled[split] + n)
            filled[split] += n
    for split, n in valid_per_split.items():
        if filled[split] != n:
            raise ValueError(f"{uris[0].rsplit('/', 1)[0]}: shards hold {filled[split]} valid {split} images, their "
                             f"footers say {n}; delete the cache and embed again")
    for arr in (*index.values(), *emb.values()):
        arr.flush()
