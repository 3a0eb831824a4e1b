"""The whole pipeline at the size of LF-AmazonTitles-1.3M on one box, through the real job functions.

Sizes (``--scale F`` multiplies them; ``--quick`` = ``--scale 0.05``): 2,248,619 train / 970,237 test items,
1,305,265 labels, 22 labels per item, label frequency long-tailed (``data.synthetic.topic_zipf``, default 0.8: the
most frequent label is on ~1/4 of the items, the rarest on a handful). Data: the synthetic generator's raw XC format
(image-less; one attribute, so every label is a topic named by 3 pseudo-words and an item's text names 2 of the 3
words of each of its topics: a learnable text signal, truncated to ``model.max_length`` tokens).

Model: ``tiny:bert``, a 2-layer random BERT encoder (hidden 64, 4 heads, feed-forward 128, the MiniLM WordPiece
tokenizer; :mod:`vixml_ray.model.tiny`) with PRIME prototypes over all labels (``model.prototypes``, 2^k label
clusters of ~20 labels).

Stages, each a job of :mod:`vixml_ray.cli` run in this process (one local Ray for all of them):

1. ``generate``: ``prepare_data --synthetic --format xc``;  2. ``prepare``: ``prepare_data --source``;
3. ``train``: Ray Train, 2 DDP workers (global negatives), clustered batches from epoch 0 (one clustering of all
   training queries' embeddings), prototypes, stopped by ``train.max_minutes``; then its end: centroids, test, export;
4. ``forward``: the plain side of the refresh ratio: the model's forward alone over every label in this process with
   every CPU (tokenised beforehand, as ``bench/index.py`` does);
5. ``refresh``: ``refresh_labels`` of all labels with the RAA part (every training query);
6. ``index_flat`` / ``index_ivf``: a 4-shard ``ShardedIndex`` (exact / IVF) over the version: start-up (load +
   build) and 1,000 searches of a block of label vectors (IVF recall@100 against exact);
7. ``eval`` / ``eval_raa``: ``evaluate`` on a uniform sample of ``eval.sample_size`` test items (100,000 at full
   size), without and with retrieval augmentation;
8. ``predict``: ``predict`` over 1,000 test queries as JSONL;
9. ``incremental``: ``refresh_labels --incremental`` after 1% of label texts changed (a copy of the dataset).

A background thread samples every second: this process's RSS (the driver), the largest RSS among the Ray worker
processes (psutil over this process's descendants named ``ray::*``) and the object store's use (Ray's memory
summary). Per stage: wall seconds, throughput, those peaks, bytes written. Prints the table, writes it as
``<workdir>/scale.md``, and ends with one JSON line: ``refresh_ratio`` (refresh labels/s over the forward's),
``incremental_fraction`` (incremental seconds / full refresh seconds), ``max_rss_gb`` (any single process), per-stage
seconds and the metrics.

    python bench/scale.py --quick                 # 1/20 of the size (11 min measured on 2 shared cores, load ~15)
    python bench/scale.py --workdir /data/scale   # full size
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FULL = {"train": 2_248_619, "test": 970_237, "labels": 1_305_265}
LABELS_PER_ITEM = 22
EVAL_SAMPLE = 100_000
PREDICT_QUERIES = 1_000
SEARCH_QUERIES = 1_000
CHANGED_FRACTION = 0.01
SHARDS = 4
GB = 2**30


# ------------------------------------------------------------------------------------------------------ sampling
@dataclass
class Peaks:
    driver_rss: int = 0
    worker_rss: int = 0
    object_store: int = 0


@dataclass
class Sampler:
    """Samples the driver's RSS, the largest Ray worker's RSS and the object store's use every ``every_s``."""

    every_s: float = 1.0
    store_samples: list[int] = field(default_factory=lambda: [0, 0])  # object-store samples [failed, taken]
    peaks: Peaks = field(default_factory=Peaks)
    overall: Peaks = field(default_factory=Peaks)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "Sampler":
        threading.Thread(target=self._run, daemon=True, name="scale-sampler").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def reset(self) -> Peaks:
        """The peaks since the last reset (and starts new ones)."""
        with self._lock:
            peaks, self.peaks = self.peaks, Peaks()
        return peaks

    def _run(self) -> None:
        me = psutil.Process()
        store_every, last_store = 3.0, 0.0
        while not self._stop.wait(self.every_s):
            driver = me.memory_info().rss
            worker = 0
            for proc in me.children(recursive=True):
                try:
                    if proc.name().startswith("ray::"):
                        worker = max(worker, proc.memory_info().rss)
                except psutil.Error:
                    continue
            store = 0
            if time.monotonic() - last_store >= store_every:
                sample, last_store = _object_store_bytes(), time.monotonic()
                self.store_samples[sample is not None] += 1
                store = sample or 0
            with self._lock:
                for peaks in (self.peaks, self.overall):
                    peaks.driver_rss = max(peaks.driver_rss, driver)
                    peaks.worker_rss = max(peaks.worker_rss, worker)
                    peaks.object_store = max(peaks.object_store, store)


def _object_store_bytes() -> int | None:
    """Bytes in Ray's object store (all nodes), from the raylet's memory info (what ``ray memory`` reads); None when
    Ray is not up or the call failed."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address),
                                      timeout_seconds=10.0)
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - a missed sample is counted, not fatal
        return None


def _bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# -------------------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    name: str
    seconds: float
    count: int
    unit: str
    peaks: Peaks
    written: int
    extra: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


class Run:
    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.stages: list[Stage] = []

    def stage(self, name: str, count: int, unit: str, fn: Callable[[], Any], written: Callable[[], int] = lambda: 0,
              extra: Callable[[Any], dict] = lambda _: {}) -> Any:
        self.sampler.reset()
        print(f"[scale] {name}: {count:,} {unit} ...", flush=True)
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        time.sleep(self.sampler.every_s)  # one more sample of the stage's end state
        stage = Stage(name, seconds, count, unit, self.sampler.reset(), written(), extra(result))
        self.stages.append(stage)
        print(f"[scale] {name}: {seconds:.1f} s, {stage.rate:,.0f} {unit}/s, driver "
              f"{stage.peaks.driver_rss / GB:.2f} GB, worker {stage.peaks.worker_rss / GB:.2f} GB, object store "
              f"{stage.peaks.object_store / GB:.2f} GB, {stage.written / 2**20:,.0f} MB written {stage.extra}",
              flush=True)
        return result

    def table(self) -> str:
        lines = ["| stage | wall s | items | per s | driver RSS GB | largest worker RSS GB | object store GB | "
                 "written MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in self.stages:
            lines.append(f"| {s.name} | {s.seconds:.1f} | {s.count:,} {s.unit} | {s.rate:,.0f} | "
                         f"{s.peaks.driver_rss / GB:.2f} | {s.peaks.worker_rss / GB:.2f} | "
                         f"{s.peaks.object_store / GB:.2f} | {s.written / 2**20:,.0f} |")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- steps
def _forward(export: str, dataset: str, cpus: int, batch_size: int) -> float:
    """Seconds of the model's forward alone over every label (tokenised beforehand), ``cpus`` threads."""
    import torch

    from vixml_ray.data.dataset import open_dataset
    from vixml_ray.model import embed_arrays, load_export, tokenize

    ds = open_dataset(dataset)
    embedder = load_export(export).eval()
    tokens = tokenize(embedder.tokenizer, ds.texts("label"), embedder.cfg.model.max_length)
    previous = torch.get_num_threads()
    torch.set_num_threads(cpus)
    try:
        start = time.perf_counter()
        embed_arrays(embedder, tokens, batch_size=batch_size, label_ids=np.arange(ds.num_labels))
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def _index_stage(index_dir: str, kind: str, shards: int, cpus: int, nlist: int, exact: np.ndarray | None
                 ) -> dict[str, Any]:
    from vixml_ray.config import IndexConfig
    from vixml_ray.index import ShardedIndex, read_manifest, read_rows

    manifest = read_manifest(index_dir)
    n = min(SEARCH_QUERIES, manifest.num_labels)  # one block of label vectors (a read per row costs a part each)
    lo = int(np.random.default_rng(0).integers(0, manifest.num_labels - n + 1))
    queries = read_rows(index_dir, manifest, lo, lo + n)
    cfg = IndexConfig(num_shards=shards, kind=kind, cpus_per_shard=cpus / shards, ivf_nlist=nlist, ivf_nprobe=32)
    start = time.perf_counter()
    with ShardedIndex(index_dir, cfg) as index:
        start_s = time.perf_counter() - start
        t = time.perf_counter()
        _, ids, _ = index.search(queries, 100)
        search_s = time.perf_counter() - t
        info = index.info()
    out = {"start_s": round(start_s, 2), "qps": round(len(queries) / search_s, 1),
           "shard_rss_gb": round(max(s["rss_bytes"] for s in info) / GB, 3), "ids": ids}
    if exact is not None:
        out["recall@100"] = round(float(np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(ids, exact)])), 4)
    return out


def _change_labels(dataset: str, out: str, fraction: float) -> int:
    """A copy of ``dataset`` with ``fraction`` of its label texts changed (uids kept); returns how many."""
    from vixml_ray.data import schema

    shutil.copytree(dataset, out)
    path = Path(out) / schema.SPLIT_FILES["label"]
    table = pq.read_table(path)
    n = table.num_rows
    changed = np.zeros(n, dtype=bool)
    changed[np.random.default_rng(1).choice(n, size=max(1, round(fraction * n)), replace=False)] = True
    text = pc.if_else(pa.array(changed), pc.binary_join_element_wise(table.column("text"), "revised", " "),
                      table.column("text"))
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", text), path)
    return int(changed.sum())


def _write_queries(dataset: str, out: str, n: int) -> int:
    from vixml_ray.data.dataset import open_dataset

    table = open_dataset(dataset).table("test", ["uid", "text"]).slice(0, n)
    with open(out, "w", encoding="utf-8") as f:
        for uid, text in zip(table.column("uid").to_pylist(), table.column("text").to_pylist()):
            f.write(json.dumps({"id": uid, "text": text}) + "\n")
    return table.num_rows


# ----------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the LF-AmazonTitles-1.3M size")
    parser.add_argument("--quick", action="store_true", help="--scale 0.05 and a 2-minute training budget")
    parser.add_argument("--train-minutes", type=float, default=None, help="train.max_minutes (default 30; quick 2)")
    parser.add_argument("--zipf", type=float, default=0.8, help="data.synthetic.topic_zipf")
    parser.add_argument("--workdir", default=None, help="where everything is written (default: a temp dir, kept)")
    args = parser.parse_args()
    scale = 0.05 if args.quick else args.scale
    minutes = args.train_minutes if args.train_minutes is not None else (2.0 if args.quick else 30.0)
    sizes = {k: max(100, round(v * scale)) for k, v in FULL.items()}
    cpus = os.cpu_count() or 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vixml-scale-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    from vixml_ray.cli import run

    raw, dataset, changed = work / "raw", work / "dataset", work / "dataset-changed"
    index, train_out = work / "index", work / "train"
    clusters = 1 << max(1, int(math.log2(sizes["labels"] / 20)))
    sample = min(sizes["test"], max(1000, round(EVAL_SAMPLE * scale)))
    common = [f"cache_dir={work / 'cache'}", f"ray.num_cpus={cpus}", "data.filters=none"]
    data = [f"data.synthetic.num_train={sizes['train']}", f"data.synthetic.num_test={sizes['test']}",
            f"data.synthetic.num_topics={sizes['labels']}", "data.synthetic.num_attributes=1",
            f"data.synthetic.labels_per_item={LABELS_PER_ITEM}", f"data.synthetic.topic_zipf={args.zipf}",
            "data.synthetic.max_images=0"]
    model = ["model.name_or_path=tiny:bert", "model.kind=encoder", "model.max_length=32", "model.use_images=false",
             "model.prototypes.enabled=true", f"model.prototypes.num_clusters={clusters}"]
    train = [f"out_dir={train_out}", f"data.dataset={dataset}", "train.epochs=2", "train.batch_size=256",
             f"train.max_minutes={minutes}", "train.num_workers=2", "train.cpus_per_worker=1",
             "train.cluster.start_epoch=0", "train.cluster.refresh_every=1", "train.cluster.initial_size=16",
             "train.cluster.double_at=[]", "train.lr_backbone=0.001", "train.lr_projection=0.002",
             "train.warmup_steps=20", "train.progress_every_s=60", "eval.batch_size=512",
             "data.max_validation=2000"]
    infer = [f"cache_dir={work / 'cache'}", "infer.num_cpus_per_actor=1", f"infer.actor_threads={cpus}",
             "infer.batch_size=512", "infer.rows_per_batch=8192", "infer.raa.enabled=true",
             f"index.num_shards={SHARDS}", f"index.cpus_per_shard={cpus / SHARDS}", "eval.batch_size=512"]

    sampler = Sampler().start()
    bench = Run(sampler)
    total_items = sizes["train"] + sizes["test"]
    try:
        bench.stage("generate", total_items, "items",
                    lambda: run("prepare_data", ["--synthetic", "--format", "xc", "--out", str(raw), "--overwrite",
                                                 *common, *data]), lambda: _bytes(raw))
        bench.stage("prepare", total_items, "items",
                    lambda: run("prepare_data", ["--source", str(raw), "--out", str(dataset), "--overwrite",
                                                 *common]), lambda: _bytes(dataset))
        summary = bench.stage("train", sizes["train"], "queries",
                              lambda: run("train", ["--run-name", "scale", *common, *model, *train]),
                              lambda: _bytes(train_out),
                              lambda s: {k: s.get(k) for k in ("steps", "epochs", "samples_per_s", "test_P@1",
                                                              "val_P@1")})
        export = summary["checkpoint"]
        forward_s = bench.stage("forward", sizes["labels"], "labels",
                                lambda: _forward(export, str(dataset), cpus, 512))
        refresh = bench.stage("refresh", sizes["labels"], "labels",
                              lambda: run("refresh_labels", ["--checkpoint", export, "--dataset", str(dataset),
                                                             "--out", str(index), *infer]), lambda: _bytes(index),
                              lambda s: {"labels_per_s": s["labels_per_s"], "pipeline_s": s["pipeline_s"],
                                         "queries_pipeline_s": s["queries"]["pipeline_s"]})
        nlist = max(16, 1 << int(math.log2(max(1.0, 4 * math.sqrt(sizes["labels"] / SHARDS)))))
        flat = bench.stage("index_flat", SEARCH_QUERIES, "queries",
                           lambda: _index_stage(str(index), "flat", SHARDS, cpus, nlist, None),
                           extra=lambda r: {k: v for k, v in r.items() if k != "ids"})
        bench.stage("index_ivf", SEARCH_QUERIES, "queries",
                    lambda: _index_stage(str(index), "ivf", SHARDS, cpus, nlist, flat["ids"]),
                    extra=lambda r: {k: v for k, v in r.items() if k != "ids"})
        metrics = {}
        for name, raa in (("eval", "false"), ("eval_raa", "true")):
            out = work / name
            metrics[name] = bench.stage(
                name, sample, "queries",
                lambda: run("evaluate", ["--checkpoint", export, "--dataset", str(dataset), "--index", str(index),
                                         "--out", str(out), "--overwrite", *infer, f"infer.raa.enabled={raa}",
                                         f"eval.sample_size={sample}", "eval.sample_seed=0"]),
                lambda: _bytes(out), lambda s: {k: s[k] for k in ("P@1", "P@5", "PSP@5")})
        queries = work / "queries.jsonl"
        n_queries = _write_queries(str(dataset), str(queries), PREDICT_QUERIES)
        bench.stage("predict", n_queries, "queries",
                    lambda: run("predict", ["--checkpoint", export, "--index", str(index), "--queries", str(queries),
                                            "--out", str(work / "predictions.jsonl"), "--overwrite", *infer]),
                    lambda: _bytes(work / "predictions.jsonl"))
        shutil.rmtree(changed, ignore_errors=True)
        n_changed = _change_labels(str(dataset), str(changed), CHANGED_FRACTION)
        before = _bytes(index)
        incremental = bench.stage("incremental", n_changed, "labels",
                                  lambda: run("refresh_labels", ["--checkpoint", export, "--dataset", str(changed),
                                                                 "--out", str(index), "--incremental", *infer]),
                                  lambda: _bytes(index) - before,
                                  lambda s: {"embedded": s["embedded"], "carried": s["carried"]})
    finally:
        sampler.stop()

    by_name = {s.name: s for s in bench.stages}
    table = bench.table()
    (work / "scale.md").write_text(f"sizes: {sizes}, {cpus} CPUs\n\n{table}\n", encoding="utf-8")
    print(table)
    forward_rate = sizes["labels"] / forward_s
    result = {
        "bench": "scale", "scale": scale, "sizes": sizes, "cpus": cpus, "model": "tiny:bert (2 layers, hidden 64)",
        "train_minutes": minutes, "eval_sample": sample,
        "refresh_ratio": round(refresh["labels_per_s"] / forward_rate, 3),
        "refresh_job_ratio": round(sizes["labels"] / (by_name["refresh"].seconds - refresh["queries"]["pipeline_s"])
                                   / forward_rate, 3),
        "forward_labels_per_s": round(forward_rate, 1),
        "incremental_fraction": round(by_name["incremental"].seconds / by_name["refresh"].seconds, 4),
        "incremental": {"embedded": incremental["embedded"], "carried": incremental["carried"]},
        "max_rss_gb": round(max(sampler.overall.driver_rss, sampler.overall.worker_rss) / GB, 3),
        "driver_rss_gb": round(sampler.overall.driver_rss / GB, 3),
        "worker_rss_gb": round(sampler.overall.worker_rss / GB, 3),
        "object_store_gb": round(sampler.overall.object_store / GB, 3),
        "object_store_samples": {"taken": sampler.store_samples[1], "failed": sampler.store_samples[0]},
        "metrics": {name: {k: m[k] for k in ("P@1", "P@5", "PSP@5")} for name, m in metrics.items()},
        "seconds": {s.name: round(s.seconds, 1) for s in bench.stages},
        "rates": {s.name: round(s.rate, 1) for s in bench.stages},
        "table": str(work / "scale.md"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
