"""embed_images: a dataset's image manifest -> its image feature cache, as one streaming Ray Data job.

The driver streams ``images.parquet`` in input shards of ``vision.rows_per_shard`` rows and skips every shard whose
output is complete and current (:mod:`vixml_ray.vision.cache`); the others flow through

    manifest blocks -> decode + preprocess (CPU tasks) -> embed (actor pool, one tower per actor) -> driver

and the driver writes each output shard as soon as all its rows are back. The two stages scale separately
(``decode_num_cpus``/``decode_tasks`` vs ``min_actors..max_actors`` with ``num_gpus_per_actor``) and overlap: Ray
Data streams blocks between them, so actors embed while the next images decode. When every shard is complete the
bank is (re)built, the cache manifest written last, and the cache registered in the dataset manifest.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm.auto import tqdm

from vixml_ray import storage
from vixml_ray.config import Config, save_config
from vixml_ray.data import schema
from vixml_ray.data.dataset import Dataset, open_dataset
from vixml_ray.errors import InputError
from vixml_ray.ray_utils import init_ray_for
from vixml_ray.vision import cache
from vixml_ray.vision.fetch import fetch_options
from vixml_ray.vision.stages import EmbedActor, decode_batch
from vixml_ray.vision.towers import feature_slug, load_preprocessor, load_tower, model_fingerprint, model_info

MANIFEST_COLUMNS = ("split", "row", "uid", "slot", "uri")
BATCHES_PER_BLOCK = 4  # decode batches per input block: one decode task reads one block


# ------------------------------------------------------------------------------------------------------ planning
def check_manifest_rows(table: pa.Table, num_rows: dict[str, int], where: str) -> None:
    """Rejects image manifest rows that name an unknown split, a row outside its split or a bad slot."""
    for split in pc.unique(table.column("split")).to_pylist():
        if split not in num_rows:
            raise InputError(where, None, f"unknown split {split!r} (splits: {', '.join(num_rows)})")
        rows = pc.filter(table.column("row"), pc.equal(table.column("split"), split))
        low, high = pc.min_max(rows).as_py().values()
        if low < 0 or high >= num_rows[split]:
            bad = low if low < 0 else high
            raise InputError(where, None, f"{split} row {bad} outside 0..{num_rows[split] - 1}")
    slots = pc.min_max(table.column("slot")).as_py()
    if slots["min"] is not None and (slots["min"] < 0 or slots["max"] >= schema.MAX_IMAGES):
        raise InputError(where, None, f"slot outside 0..{schema.MAX_IMAGES - 1}")


def iter_input_shards(manifest_uri: str, rows_per_shard: int) -> Iterator[tuple[cache.ShardSpec, pa.Table]]:
    """The image manifest in consecutive shards of ``rows_per_shard`` rows (the last may be shorter), streamed."""
    fs, path = storage.filesystem(manifest_uri)
    with fs.open_input_file(path) as f:
        batches: list[pa.RecordBatch] = []
        buffered = start = index = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_shard, columns=list(MANIFEST_COLUMNS)):
            batches.append(batch)
            buffered += batch.num_rows
            while buffered >= rows_per_shard:
                table = pa.Table.from_batches(batches)
                head, rest = table.slice(0, rows_per_shard), table.slice(rows_per_shard)
                yield cache.ShardSpec(index, start, start + head.num_rows, cache.input_digest(head)), head
                batches, buffered = rest.to_batches(), rest.num_rows
                start, index = start + head.num_rows, index + 1
        if buffered:
            table = pa.Table.from_batches(batches)
            yield cache.ShardSpec(index, start, start + table.num_rows, cache.input_digest(table)), table


def _blocks(spec: cache.ShardSpec, table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """A pending shard's manifest rows with their shard index and manifest position, cut into input blocks."""
    table = table.append_column("shard", pa.array(np.full(table.num_rows, spec.index, dtype=np.int64)))
    table = table.append_column("pos", pa.array(np.arange(spec.start, spec.stop, dtype=np.int64)))
    return [table.slice(lo, rows_per_block) for lo in range(0, table.num_rows, rows_per_block)]


# ------------------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Collects the pipeline's output rows per shard and writes a shard once all its rows are back."""

    def __init__(self, cache_uri: str, specs: dict[int, cache.ShardSpec], fingerprint: str, dtype: str):
        self.cache_uri = cache_uri
        self.specs = specs
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self.have: Counter[int] = Counter()
        self.metas: dict[int, dict[str, Any]] = {}
        self.dim: Optional[int] = None
        self.model_images = 0  # images the model embedded in this run
        self.failed: Counter[str] = Counter()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.dim = int(batch["embedding"].shape[1])
        reasons = batch["reason"]
        self.model_images += int(np.sum(batch["valid"])) + int(np.sum(reasons == "non_finite"))
        self.failed.update(str(r) for r in reasons if r)
        shards = np.asarray(batch["shard"])
        for shard in np.unique(shards).tolist():
            sel = shards == shard
            self.parts.setdefault(shard, []).append({k: np.asarray(v)[sel] for k, v in batch.items()})
            self.have[shard] += int(sel.sum())
            if self.have[shard] > self.specs[shard].rows:
                raise RuntimeError(f"shard {shard}: {self.have[shard]} rows came back for {self.specs[shard].rows}")
            if self.have[shard] == self.specs[shard].rows:
                self._write(shard)

    def _write(self, shard: int) -> None:
        spec = self.specs[shard]
        parts = self.parts.pop(shard)
        columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(columns["pos"], kind="stable")
        columns = {k: v[order] for k, v in columns.items()}
        if not np.array_equal(columns["pos"], np.arange(spec.start, spec.stop)):
            raise RuntimeError(f"shard {shard}: rows came back duplicated or missing")
        meta = cache.shard_meta(spec, self.fingerprint, columns)
        cache.write_shard(cache.shard_uri(self.cache_uri, spec),
                          cache.shard_table(columns, int(columns["embedding"].shape[1]), self.dtype, meta))
        self.metas[shard] = meta

    @property
    def incomplete(self) -> list[int]:
        return sorted(s for s in self.specs if s not in self.metas)


# ------------------------------------------------------------------------------------------------------ pipeline
def _start_ray(cfg: Config) -> float:
    """Joins or starts Ray (see :func:`vixml_ray.ray_utils.init_ray`); returns the seconds it took."""
    t0 = time.perf_counter()
    init_ray_for(cfg)
    return time.perf_counter() - t0


def _run_pipeline(cfg: Config, root: str, blocks: list[ray.ObjectRef], writer: ShardWriter, total: int,
                  progress: bool) -> dict[str, float]:
    """Streams the manifest ``blocks`` (in the object store) through decode and embed into ``writer``; returns
    timings."""
    v = cfg.vision
    preprocess = load_preprocessor(v)
    base = root if "://" in root else os.path.abspath(root)
    fetch = fetch_options(cfg, base)
    decode_compute = ray.data.TaskPoolStrategy(size=v.decode_tasks) if v.decode_tasks else None
    ds = (
        ray.data.from_arrow_refs(blocks)
        .map_batches(decode_batch, fn_kwargs={"fetch": fetch, "preprocess": preprocess}, batch_format="numpy",
                     batch_size=v.decode_batch_size, num_cpus=v.decode_num_cpus, compute=decode_compute)
        .map_batches(EmbedActor, fn_constructor_kwargs={"vision": v, "input_names": preprocess.input_names},
                     batch_format="numpy", batch_size=v.batch_size, num_cpus=v.num_cpus_per_actor,
                     num_gpus=v.num_gpus_per_actor,
                     compute=ray.data.ActorPoolStrategy(min_size=v.min_actors, max_size=v.max_actors))
    )
    t_start = time.perf_counter()
    first_at, first_rows, done = None, 0, 0
    with tqdm(total=total, unit="img", desc="embed images", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            n = len(batch["row"])
            if first_at is None:
                first_at, first_rows = time.perf_counter(), n
            writer.add(batch)
            done += n
            bar.update(n)
            bar.set_postfix(failed=sum(writer.failed.values()), refresh=False)
    end = time.perf_counter()
    steady = (done - first_rows) / (end - first_at) if first_at is not None and end > first_at else 0.0
    return {"pipeline_s": end - t_start,
            "first_output_s": (first_at - t_start) if first_at is not None else 0.0,
            "steady_images_per_s": steady}


def embed_images(cfg: Config, dataset_uri: str, progress: bool = True) -> dict[str, Any]:
    """Embeds every image of the dataset's manifest that the cache lacks, (re)builds the feature bank when the set
    of shards changed, and registers the cache; returns the run summary (the job prints it as JSON)."""
    started = time.perf_counter()
    v = cfg.vision
    ds: Dataset = open_dataset(dataset_uri)
    root = ds.uri
    slug, fingerprint = feature_slug(v), model_fingerprint(v)
    cache_uri = storage.join(root, schema.FEATURES_DIR, slug)
    manifest_uri = storage.join(root, schema.IMAGES_FILE)
    num_rows = {s: ds.num_rows(s) for s in schema.SPLITS}

    specs: list[cache.ShardSpec] = []
    metas: dict[int, dict[str, Any]] = {}
    pending: dict[int, cache.ShardSpec] = {}
    blocks: list[ray.ObjectRef] = []  # pending manifest rows, held by the object store, not the driver
    timings: dict[str, float] = {}
    for spec, table in iter_input_shards(manifest_uri, v.rows_per_shard):
        check_manifest_rows(table, num_rows, f"{manifest_uri} rows {spec.start}..{spec.stop - 1}")
        specs.append(spec)
        meta = cache.complete_shard_meta(cache_uri, spec, fingerprint)
        if meta is not None:
            metas[spec.index] = meta
        else:
            if not pending:
                timings["ray_start_s"] = _start_ray(cfg)
            pending[spec.index] = spec
            blocks.extend(ray.put(b) for b in _blocks(spec, table, v.decode_batch_size * BATCHES_PER_BLOCK))

    writer = ShardWriter(cache_uri, pending, fingerprint, v.cache_dtype)
    if pending:
        total = sum(s.rows for s in pending.values())
        timings.update(_run_pipeline(cfg, root, blocks, writer, total, progress))
        if writer.incomplete:
            raise RuntimeError(f"{cache_uri}: shards {writer.incomplete} did not complete; run again to finish them")
        metas.update(writer.metas)

    dim = writer.dim or _cached_dim(cache_uri, specs) or load_tower(v).dim
    counts, rebuilt = cache.finish(dataset_uri, slug, specs, metas, num_rows, dim, v.cache_dtype,
                                   model_info(v, dim), fingerprint, {"rows_per_shard": v.rows_per_shard})
    if rebuilt:
        save_config(cfg, storage.join(cache_uri, cache.CACHE_CONFIG))
    pipeline_s = timings.get("pipeline_s", 0.0)
    return {
        "dataset": root, "features": cache_uri, "slug": slug, "dim": dim,
        "images": counts["images"], "valid": counts["valid"], "failed": counts["failed"],
        "converted": counts["converted"], "shards": len(specs), "shards_skipped": len(specs) - len(pending),
        "embedded": writer.model_images, "bank_rebuilt": rebuilt,
        "images_per_s": round(sum(s.rows for s in pending.values()) / pipeline_s, 2) if pipeline_s else 0.0,
        **{k: round(x, 3) for k, x in timings.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _cached_dim(cache_uri: str, specs: list[cache.ShardSpec]) -> Optional[int]:
    """The embedding dimension from the cache manifest or a shard's schema (no model needed)."""
    previous = cache.read_manifest(cache_uri)
    if previous is not None:
        return int(previous["dim"])
    if specs:
        fs, path = storage.filesystem(cache.shard_uri(cache_uri, specs[0]))
        with fs.open_input_file(path) as f:
            return int(pq.ParquetFile(f).schema_arrow.field("embedding").type.list_size)
    return None
