"""Time and memory of the frozen-encoder classifier stage (``model.classifiers``) at a million labels.

Synthetic cached query embeddings: N queries, each with 1..4 labels of L (Zipf-like popularity), embedded as the
normalised mean of their labels' random centres plus noise, so the centroids are a fair start and the loss can
fall. Runs :func:`vixml_ray.train.classifiers.train_classifiers` in this process (one rank) and prints one JSON
line: rows, labels, wall and CPU seconds of the whole stage (on a shared machine the wall time also counts other
processes), seconds of each epoch, the loss per epoch, peak RSS. The default is the
issue's target (2.2M queries, 1.3M labels, 384-d, in-batch negatives only: ``--shortlist 0``; an exact shortlist
costs N x L x d per epoch); ``--quick`` is 200k queries / 100k labels.

    python bench/classifiers.py [--quick] [--queries N] [--labels L] [--epochs E] [--shortlist K] [--batch B]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import scipy.sparse as sp
import torch

from vixml_ray.config import ClassifierLossConfig
from vixml_ray.train.classifiers import train_classifiers


def synthetic(num_queries: int, num_labels: int, dim: int, seed: int, chunk: int = 1 << 17
              ) -> tuple[np.ndarray, sp.csr_matrix]:
    """(query embeddings float32 [N, dim], labels csr [N, L]) built in chunks (centres are regenerated per label
    from its seed, never all held at once beyond one chunk's)."""
    rng = np.random.default_rng(seed)
    per_query = rng.integers(1, 5, num_queries)
    indptr = np.concatenate([[0], np.cumsum(per_query)])
    popularity = 1.0 / np.arange(1, num_labels + 1) ** 0.6
    cols = rng.choice(num_labels, size=int(indptr[-1]), p=popularity / popularity.sum())
    labels = sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr), shape=(num_queries, num_labels))
    labels.sum_duplicates()
    centres = rng.standard_normal((num_labels, dim), dtype=np.float32)
    emb = np.empty((num_queries, dim), dtype=np.float32)
    for lo in range(0, num_queries, chunk):
        block = labels[lo:lo + chunk]
        x = block @ centres / np.maximum(block.sum(1).A, 1) + 1.5 * rng.standard_normal((block.shape[0], dim),
                                                                                        dtype=np.float32)
        emb[lo:lo + block.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return emb, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200k queries and 100k labels")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--labels", type=int, default=None)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--shortlist", type=int, default=0)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--cluster-size", type=int, default=32, help="0: random batches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    queries = args.queries or (200_000 if args.quick else 2_200_000)
    labels = args.labels or (100_000 if args.quick else 1_300_000)
    start = time.perf_counter()
    emb, truth = synthetic(queries, labels, args.dim, args.seed)
    data_s = time.perf_counter() - start
    cfg = ClassifierLossConfig(epochs=args.epochs, batch_size=args.batch, shortlist=args.shortlist,
                               cluster_size=args.cluster_size or None)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train_classifiers(emb, truth, cfg, args.seed, torch.device("cpu"))
    cpu_s = time.process_time() - cpu_start
    print(json.dumps({
        "queries": queries, "labels": labels, "dim": args.dim, "trained_labels": int(result.trained.sum()),
        "data_s": round(data_s, 1), "stage_s": round(time.perf_counter() - start, 1),
        "stage_cpu_s": round(cpu_s, 1),
        "epoch_s": [round(h["seconds"], 1) for h in result.history],
        "loss": [round(h["loss"], 4) for h in result.history], "shortlist": args.shortlist,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }), flush=True)


if __name__ == "__main__":
    main()
