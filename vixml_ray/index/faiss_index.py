"""Building one FAISS inner-product index over a block of label vectors, and searching it deterministically."""

from __future__ import annotations

import logging

import faiss
import numpy as np

from vixml_ray.config import IndexConfig
from vixml_ray.index.merge import top_k_sorted

log = logging.getLogger(__name__)

MIN_POINTS_PER_LIST = 39  # faiss k-means wants >= 39 training points per centroid


def build_index(vectors: np.ndarray, cfg: IndexConfig, use_gpu: bool = False) -> faiss.Index:
    """An inner-product index over ``vectors`` ((n, dim) float32): exact ``flat`` (IndexFlatIP), ``hnsw``
    (IndexHNSWFlat) or ``ivf`` (IndexIVFFlat trained on these vectors; ``nlist`` is capped at n / 39 for small
    blocks). ``use_gpu`` moves flat and IVF indexes to all visible GPUs (faiss has no GPU HNSW). CPU indexes can give
    their vectors back by id (:func:`vectors_of`; IVF keeps a direct map for that)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if cfg.kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
    elif cfg.kind == "ivf":
        nlist = max(1, min(cfg.ivf_nlist, n // MIN_POINTS_PER_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if n:
            index.train(vectors)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
    else:
        raise ValueError(f"unknown index kind {cfg.kind!r} (flat, hnsw, ivf)")
    if use_gpu and cfg.kind != "hnsw":
        if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
            raise RuntimeError("the index shard was given a GPU but faiss has no GPU support here "
                               "(install faiss-gpu, or set index.use_gpu=false)")
        index = faiss.index_cpu_to_all_gpus(index)
    elif use_gpu:
        log.warning("faiss has no GPU HNSW; the HNSW shard stays on CPU")
    if n:
        index.add(vectors)
    if cfg.kind == "ivf" and not use_gpu:
        index.make_direct_map()
    return index


def vectors_of(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of local ``ids`` ((m, dim) float32) of a CPU index from :func:`build_index`."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    return index.reconstruct_batch(ids)


def search_sorted(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The index's top-k per query in the deterministic order of :func:`top_k_sorted`: (scores float32, local ids
    int64), padded with -inf / -1 where the index holds fewer than k vectors.

    FAISS alone breaks score ties arbitrarily at the k-th place (its BLAS path does), so a shard could keep a
    different tied label than one global index. This asks for one extra candidate and, for the rows whose k-th score
    is tied with the last candidate, repeats with twice as many until the tie ends, so the kept set is always the
    top-k under (-score, id).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq, n = len(queries), index.ntotal
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    kk = min(k, n)
    if kk == 0 or nq == 0:
        return scores, ids
    todo, fetch = np.arange(nq), min(kk + 1, n)
    while len(todo):
        dist, found = index.search(queries[todo], fetch)
        dist = np.where(found < 0, -np.inf, dist).astype(np.float32)
        if fetch < n:
            spill = (found[:, -1] >= 0) & (dist[:, -1] == dist[:, kk - 1])
        else:
            spill = np.zeros(len(todo), dtype=bool)
        done = todo[~spill]
        scores[done, :kk], ids[done, :kk] = top_k_sorted(dist[~spill], found[~spill], kk)
        todo, fetch = todo[spill], min(2 * fetch, n)
    return scores, ids
