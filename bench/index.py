"""The sharded label index against one in-process FAISS IndexFlatIP, and HNSW / IVF against exact search.

Data (fixed, documented generator): label and query vectors are drawn from one mixture of 1,000 Gaussian centres in
``dim`` dimensions. Centres ~ N(0, I) normalised to unit length (seed 0); a vector = a uniformly chosen centre +
``spread`` * N(0, I) / sqrt(dim) (spread 0.5: the noise has norm ~0.5 against the unit centre), then L2-normalised.
Labels use seed 1, queries seed 2. The worst case for approximate search, ``isotropic``: N(0, I) normalised.

For each dim (64 and 384) on the clustered labels, in the same run and on the same query batches:
  * exact: ``ShardedIndex`` (kind=flat, S shards on Ray actors, CPUs split evenly) against one in-process
    IndexFlatIP using all cores: top-k ids identical up to float ties (scores within 1e-6), QPS ratio sharded/single;
  * approximate: sharded HNSW and IVF, recall@k against the exact sharded result and QPS ratio to it; per-shard
    build seconds and memory (resident set and vector bytes). ``--ann-isotropic-dims`` repeats them on isotropic
    vectors (their exact ground truth from the sharded flat index).

Label refresh: the real label texts of ``--refresh-source`` (default ../shared/data/dnb_casimir_gnd, 11,387 GND
subject names; with ``--quick`` cooking_stackexchange, 736 tags) embedded with the packaged pretrained
all-MiniLM-L6-v2 by ``refresh_labels`` (Ray Data: read, hash, one embedding actor running a thread per CPU of the
machine, parquet parts, commit) against the plain way, the model's forward alone (``embed_arrays`` in this process
on the same tokenised texts, every CPU of the machine, the same model batch size): labels/s of each and their ratio.

Full run: 1M labels, 10k queries, k=100, S=4 (HNSW efConstruction 100: builds dominate with exact search).
``--quick``: 30k labels, 1k queries, 64-d only, the small refresh (about 1 min). ``--ann-kinds`` (none = exact
only), ``--ann-isotropic-dims`` and ``--no-refresh`` narrow a run. The last line
printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import faiss
import numpy as np

from vixml_ray.config import IndexConfig, load_config
from vixml_ray.index import ShardedIndex, VersionWriter
from vixml_ray.ray_utils import init_ray

NUM_CENTRES = 1000
SCORE_TOL = 1e-6


def mixture(n: int, dim: int, seed: int, spread: float, isotropic: bool = False, chunk: int = 1 << 17) -> np.ndarray:
    """``n`` unit vectors from the documented mixture (or isotropic), generated in chunks (float32 throughout)."""
    centres = np.random.default_rng(0).standard_normal((NUM_CENTRES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        block = rng.standard_normal((m, dim), dtype=np.float32)
        if not isotropic:
            block = centres[rng.integers(0, NUM_CENTRES, m)] + block * (spread / np.sqrt(dim))
        out[lo:lo + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def write_labels(index_dir: str, labels: np.ndarray, parts: int = 8) -> float:
    start = time.perf_counter()
    writer = VersionWriter(index_dir)
    path = writer.new_version()
    for shard_id, rows in enumerate(np.array_split(np.arange(len(labels)), parts)):
        writer.write_shard(path, shard_id, rows, labels[rows])
    writer.commit(path, {"generator": "bench/index.py"})
    return time.perf_counter() - start


def run_batches(searches: dict[str, Any], queries: np.ndarray, k: int, batch: int) -> dict[str, tuple]:
    """Runs every search function over ``queries`` in batches, interleaved batch by batch (so that load from
    other processes on a shared machine hits all of them alike); returns name -> (scores, ids, queries per
    second). One warm-up batch per function is not timed."""
    for search in searches.values():
        search(queries[:batch], k)
    seconds = dict.fromkeys(searches, 0.0)
    parts: dict[str, list] = {name: [] for name in searches}
    for lo in range(0, len(queries), batch):
        for name, search in searches.items():
            start = time.perf_counter()
            parts[name].append(search(queries[lo:lo + batch], k))
            seconds[name] += time.perf_counter() - start
    return {name: (np.concatenate([p[0] for p in parts[name]]), np.concatenate([p[1] for p in parts[name]]),
                   len(queries) / seconds[name]) for name in searches}


def compare_exact(scores: np.ndarray, ids: np.ndarray, ref_scores: np.ndarray, ref_ids: np.ndarray) -> dict:
    """Identical up to float ties: scores match within 1e-6 and ids differ only where the reference's score is tied
    (within 1e-6) with a neighbouring rank, or at the last rank (its tie partner may lie beyond k)."""
    close = np.abs(scores - ref_scores) <= SCORE_TOL
    tied = np.zeros(ref_scores.shape, dtype=bool)
    near = np.abs(np.diff(ref_scores, axis=1)) <= SCORE_TOL
    tied[:, 1:] |= near
    tied[:, :-1] |= near
    tied[:, -1] = True
    differ = ids != ref_ids
    return {
        "identical": bool(close.all() and (~differ | tied).all()),
        "id_mismatches": int(differ.sum()),
        "max_score_diff": float(np.abs(scores - ref_scores).max()),
    }


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(ids, truth))
    return hits / (k * len(truth))


def shard_stats(index: ShardedIndex) -> dict[str, float]:
    info = index.info()
    return {
        "build_s_max": round(max(s["build_s"] + s["load_s"] for s in info), 2),
        "rss_mb_max": round(max(s["rss_bytes"] for s in info) / 2**20, 1),
        "vector_mb_max": round(max(s["vector_bytes"] for s in info) / 2**20, 1),
    }


def bench_dim(args: argparse.Namespace, cfg: IndexConfig, dim: int, workdir: str, isotropic: bool,
              with_single: bool, ann: bool) -> dict[str, Any]:
    kind = "isotropic" if isotropic else "clustered"
    labels = mixture(args.labels, dim, 1, args.spread, isotropic)
    queries = mixture(args.queries, dim, 2, args.spread, isotropic)
    index_dir = os.path.join(workdir, f"{kind}-{dim}")
    out: dict[str, Any] = {"write_s": round(write_labels(index_dir, labels), 2)}
    print(f"[{kind} {dim}-d] {args.labels} labels written in {out['write_s']} s", flush=True)

    searches: dict[str, Any] = {}
    if with_single:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        single = faiss.IndexFlatIP(dim)
        single.add(labels)
        searches["single"] = single.search
    del labels
    start = time.perf_counter()
    with ShardedIndex(index_dir, dataclasses.replace(cfg, kind="flat")) as index:
        out["flat"] = {"start_s": round(time.perf_counter() - start, 2), **shard_stats(index)}
        searches["sharded"] = lambda q, k: index.search(q, k)[:2]
        runs = run_batches(searches, queries, args.k, args.batch)
    scores, ids, qps = runs["sharded"]
    out["flat"]["qps"] = round(qps, 1)
    if with_single:
        ref_scores, ref_ids, single_qps = runs["single"]
        out["flat"].update(single_qps=round(single_qps, 1), ratio=round(qps / single_qps, 3),
                           **compare_exact(scores, ids, ref_scores, ref_ids))
        del single, searches
    print(f"[{kind} {dim}-d] exact: {out['flat']}", flush=True)

    for ann_kind in args.ann_kinds if ann else ():
        start = time.perf_counter()
        with ShardedIndex(index_dir, dataclasses.replace(cfg, kind=ann_kind)) as index:
            stats = {"start_s": round(time.perf_counter() - start, 2), **shard_stats(index)}
            _, ann_ids, ann_qps = run_batches({ann_kind: lambda q, k: index.search(q, k)[:2]}, queries, args.k,
                                              args.batch)[ann_kind]
        out[ann_kind] = {**stats, "qps": round(ann_qps, 1), "speedup": round(ann_qps / qps, 2),
                         "recall": round(recall(ann_ids, ids), 4)}
        print(f"[{kind} {dim}-d] {ann_kind}: {out[ann_kind]}", flush=True)
    return out


def bench_refresh(source: str, workdir: str, cpus: int) -> dict[str, Any]:
    """labels/s of ``refresh_labels`` (the whole job, and its Ray Data pipeline) against ``embed_arrays`` alone."""
    import torch

    from vixml_ray.data import prepare_dataset
    from vixml_ray.data.dataset import open_dataset
    from vixml_ray.index.refresh import refresh_labels
    from vixml_ray.model import build_embedder, embed_arrays, load_export, tokenize

    # Both sides get every CPU: the plain forward all threads; the job's embedding actor reserves one CPU less (the
    # pipeline's read/write tasks need a slot in Ray's accounting) but runs as many threads as the plain side.
    threads = cpus
    cfg = load_config(None, ["model.name_or_path=packaged:all-MiniLM-L6-v2", f"cache_dir={workdir}/cache",
                             f"infer.num_cpus_per_actor={max(1, cpus - 1)}", f"infer.actor_threads={threads}",
                             "infer.batch_size=256", "data.filters=none"])
    dataset = os.path.join(workdir, "refresh-dataset")
    prepare_dataset(source, dataset, cfg)
    export = os.path.join(workdir, "refresh-export")
    build_embedder(cfg, None).save_export(export)

    texts = open_dataset(dataset).texts("label")
    embedder = load_export(export).eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokens = tokenize(embedder.tokenizer, texts, cfg.model.max_length)
        start = time.perf_counter()
        embed_arrays(embedder, tokens, batch_size=cfg.infer.batch_size)
        forward_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    summary = refresh_labels(export, dataset, os.path.join(workdir, "refresh-index"), cfg)
    out = {"labels": len(texts), "forward_labels_per_s": round(len(texts) / forward_s, 1),
           "refresh_labels_per_s": round(len(texts) / summary["seconds"], 1),
           "pipeline_labels_per_s": summary["labels_per_s"]}
    out["ratio"] = round(out["refresh_labels_per_s"] / out["forward_labels_per_s"], 3)
    out["pipeline_ratio"] = round(out["pipeline_labels_per_s"] / out["forward_labels_per_s"], 3)
    print(f"[refresh] {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30k labels, 1k queries, 64-d only")
    parser.add_argument("--labels", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--dims", type=int, nargs="*", default=None, help="(none: skip the exact/ANN comparison)")
    parser.add_argument("--ann-kinds", nargs="*", default=["hnsw", "ivf"], choices=["hnsw", "ivf"])
    parser.add_argument("--ann-isotropic-dims", type=int, nargs="*", default=None,
                        help="dims on which HNSW/IVF are also measured on isotropic vectors (default: 64)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-construction", type=int, default=100)
    parser.add_argument("--hnsw-ef-search", type=int, default=256)
    parser.add_argument("--ivf-nlist", type=int, default=1024)
    parser.add_argument("--ivf-nprobe", type=int, default=32)
    parser.add_argument("--workdir", default=None, help="where label versions are written (default: a temp dir)")
    parser.add_argument("--refresh-source", default=None,
                        help="raw XC folder whose labels the refresh bench embeds (default: ../shared/data/"
                             "dnb_casimir_gnd, with --quick cooking_stackexchange)")
    parser.add_argument("--no-refresh", action="store_true", help="skip the label-refresh throughput bench")
    args = parser.parse_args()
    args.labels = args.labels or (30_000 if args.quick else 1_000_000)
    args.queries = args.queries or (1_000 if args.quick else 10_000)
    args.dims = ([64] if args.quick else [64, 384]) if args.dims is None else args.dims
    iso_dims = [64] if args.ann_isotropic_dims is None else args.ann_isotropic_dims
    args.batch = min(args.batch, args.queries)
    shared_data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
    args.refresh_source = args.refresh_source or os.path.join(
        shared_data, "cooking_stackexchange" if args.quick else "dnb_casimir_gnd")

    cpus = os.cpu_count() or 1
    init_ray(num_cpus=cpus, local_only=True)
    cfg = IndexConfig(num_shards=args.shards, cpus_per_shard=cpus / args.shards, hnsw_m=args.hnsw_m,
                      hnsw_ef_construction=args.hnsw_ef_construction, hnsw_ef_search=args.hnsw_ef_search,
                      ivf_nlist=args.ivf_nlist, ivf_nprobe=args.ivf_nprobe)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for dim in args.dims:
            results[f"clustered/{dim}"] = bench_dim(args, cfg, dim, workdir, False, True, True)
        for dim in iso_dims:
            results[f"isotropic/{dim}"] = bench_dim(args, cfg, dim, workdir, True, False, True)
        refresh = None
        if not args.no_refresh:
            refresh = bench_refresh(os.path.abspath(args.refresh_source), workdir, cpus)

    exact = [r["flat"] for key, r in results.items() if key.startswith("clustered/")]
    ann = {f"{kind}/{key}": r[kind] for key, r in results.items() for kind in ("hnsw", "ivf") if kind in r}
    print(json.dumps({
        "bench": "index",
        "labels": args.labels,
        "queries": args.queries,
        "k": args.k,
        "shards": args.shards,
        "cpus": cpus,
        "identical": all(r["identical"] for r in exact) if exact else None,
        "ratio": min(r["ratio"] for r in exact) if exact else None,
        "ratio_by_dim": {key: r["flat"]["ratio"] for key, r in results.items() if "ratio" in r["flat"]},
        "recall": {key: r["recall"] for key, r in ann.items()},
        "ann_speedup": {key: r["speedup"] for key, r in ann.items()},
        "build_s_per_shard": {f"{kind}/{key}": r[kind]["build_s_max"] for key, r in results.items()
                              for kind in ("flat", "hnsw", "ivf") if kind in r},
        "rss_mb_per_shard": {f"{kind}/{key}": r[kind]["rss_mb_max"] for key, r in results.items()
                             for kind in ("flat", "hnsw", "ivf") if kind in r},
        "refresh": refresh,
        "params": {"hnsw_m": args.hnsw_m, "hnsw_ef_construction": args.hnsw_ef_construction,
                   "hnsw_ef_search": args.hnsw_ef_search, "ivf_nlist": args.ivf_nlist,
                   "ivf_nprobe": args.ivf_nprobe, "spread": args.spread},
        "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
