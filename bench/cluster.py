"""Time to split N random 384-d query embeddings into balanced clusters of 16..1024 rows (balanced hierarchical 2-means).

Prints one JSON line: rows, dim, wall and CPU seconds per cluster size (CPU time of this process, all threads: on a
shared machine the wall time also counts other processes), cluster-size range per size, peak RSS.
``--quick`` uses 200k rows instead of 3M. On a busy machine run it with ``OPENBLAS_NUM_THREADS=1``: BLAS threads
that wait for a core spin and inflate the CPU time; single-threaded, CPU seconds equal the wall time of an idle core.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from vixml_ray.train.clustering import balanced_clusters


def random_embeddings(n: int, dim: int, seed: int, chunk: int = 1 << 18) -> np.ndarray:
    """L2-normalised Gaussian vectors (what an untrained embedder's outputs look like), built in chunks."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - lo), dim), dtype=np.float32)
        x[lo : lo + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200k rows instead of 3M")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = args.rows or (200_000 if args.quick else 3_000_000)

    x = random_embeddings(rows, args.dim, args.seed)
    seconds, cpu_seconds, size_range = {}, {}, {}
    for size in args.sizes:
        start, cpu_start = time.perf_counter(), time.process_time()
        ids = balanced_clusters(x, size, seed=args.seed, iters=args.iters)
        seconds[str(size)] = round(time.perf_counter() - start, 2)
        cpu_seconds[str(size)] = round(time.process_time() - cpu_start, 2)
        counts = np.bincount(ids)
        size_range[str(size)] = [int(counts.min()), int(counts.max())]
        print(f"clusters of ~{size}: {len(counts)} clusters of {counts.min()}..{counts.max()} rows "
              f"in {seconds[str(size)]:.1f} s ({cpu_seconds[str(size)]:.1f} CPU s)", flush=True)
    print(json.dumps({
        "rows": rows,
        "dim": args.dim,
        "iters": args.iters,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "cluster_rows": size_range,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))


if __name__ == "__main__":
    main()
