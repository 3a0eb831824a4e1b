"""The HTTP service (vixml_ray.serve) under closed-loop load, against the in-process Predictor and Ray Serve's floor.

Model: the packaged pretrained all-MiniLM-L6-v2 (384-d, no images) exported untrained. Labels: ``--labels`` random
unit vectors (N(0, I) normalised, seed 1; the isotropic case: no cluster structure) written through the index's own
version writer with the export's identity (so the service accepts them) and synthetic names, 4 shards. Queries:
``--queries`` synthetic product titles (seeded word draws).

Measured in one run on the same queries, in this order (one at a time, so they never share the cores):
  * in-process: ``Predictor.predict`` on one query at a time (latency, QPS) and on 32-query batches (queries/s);
  * floor: the same Serve topology (FastAPI ingress -> @serve.batch encoder -> 4 shard deployments) whose encoder
    and shards are no-ops: what Ray Serve itself costs on this box;
  * served: the real app; C = 1 and C = 32 closed-loop clients (threads with their own httpx connection on
    127.0.0.1) sending single-query requests, then C = 4 clients sending 32-query requests; a new index version is
    committed during the C = 32 load and must be picked up with zero failed requests.

Targets (issue 14): ``qps_ratio`` = served / in-process queries/s with 32 queries per request >= 0.8;
``c1_overhead_ms`` = served p50 - (in-process p50 + floor p50) at C = 1 <= 5; ``single_qps_ratio`` = served QPS at
C = 32 / (1 / (1 / in-process QPS + 1 / floor QPS)) >= 0.8; ``errors`` = ``swap_errors`` = 0.

Full run: 1,000,000 labels; ``--quick``: 100,000 labels and shorter loads (under 5 minutes). The last line printed
is a JSON summary.
"""

# no "from __future__ import annotations": FastAPI must see the floor route's parameter types

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_SERVE_ENABLE_ACCESS_LOG", "0")  # before Serve starts: no log line per request

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from ray import serve  # noqa: E402

from vixml_ray.config import load_config  # noqa: E402
from vixml_ray.index import VersionWriter  # noqa: E402
from vixml_ray.index.tables import write_labels  # noqa: E402
from vixml_ray.inference.export import read_export  # noqa: E402
from vixml_ray.model import build_embedder  # noqa: E402
from vixml_ray.predict.predictor import Predictor, Query  # noqa: E402
from vixml_ray.ray_utils import init_ray  # noqa: E402
from vixml_ray.serve.app import application  # noqa: E402
from vixml_ray.serve.run import start, stop  # noqa: E402

SHARDS = 4
K = 10
BATCH = 32
WORDS = ("red blue steel cotton kids garden lamp chair phone case cable wireless organic coffee mug travel bag "
         "leather wallet running shoes yoga mat desk shelf led strip usb charger glass bottle wooden toy").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def titles(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def write_version(index_dir: str, export_uri: str, num_labels: int, seed: int, dim: int = 384) -> str:
    """A committed version of ``num_labels`` random unit vectors with the export's identity; returns its name."""
    writer = VersionWriter(index_dir)
    path = writer.new_version()
    version = path.rstrip("/").rsplit("/", 1)[-1]
    rng = np.random.default_rng(seed)
    chunk = 65536
    for part, lo in enumerate(range(0, num_labels, chunk)):
        hi = min(num_labels, lo + chunk)
        block = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        writer.write_shard(path, part, np.arange(lo, hi), block / np.linalg.norm(block, axis=1, keepdims=True))
    rows = np.arange(num_labels)
    labels = pa.table({"row": rows, "uid": [f"L{i}" for i in rows], "text": [f"label {i}" for i in rows],
                       "content_hash": ["-"] * num_labels})
    write_labels(path, labels, np.full(num_labels, None, dtype=object), version)
    writer.commit(path, {"export": read_export(export_uri).identity()})
    return version


# ----------------------------------------------------------------------------------------------- the floor app
floor_app = FastAPI()


class NoopEncoder:
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, requests: list[list[str]]) -> list[np.ndarray]:
        return [np.zeros((len(r), 384), dtype=np.float32) for r in requests]


class NoopShard:
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(queries), k), dtype=np.float32), np.zeros((len(queries), k), dtype=np.int64)


@serve.ingress(floor_app)
class FloorIngress:
    def __init__(self, encoder: Any, shards: list[Any]):
        self.encoder, self.shards = encoder, shards

    @floor_app.post("/v1/predict")
    async def predict(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        embeddings = await self.encoder.embed.remote([q["text"] for q in body["queries"]])
        parts = [await r for r in [s.search.remote(embeddings, body.get("k", K)) for s in self.shards]]
        return {"version": "floor", "results": [{"labels": [], "image_errors": []} for _ in parts[0][0]]}


def floor_application() -> serve.Application:
    free = {"ray_actor_options": {"num_cpus": 0}}  # Serve's default of 1 CPU per replica would not fit on 2 cores
    encoder = serve.deployment(NoopEncoder).options(name="encoder", max_ongoing_requests=64, **free).bind()
    shards = [serve.deployment(NoopShard).options(name=f"shard-{i}", **free).bind() for i in range(SHARDS)]
    return serve.deployment(FloorIngress).options(name="ingress", max_ongoing_requests=128, **free).bind(
        encoder, shards)


# ----------------------------------------------------------------------------------------------------- loads
def summary(latencies: list[float], errors: int, seconds: float, per_request: int) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "errors": errors, "qps": round(len(latencies) / seconds, 2),
            "queries_per_s": round(len(latencies) * per_request / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def closed_loop(url: str, queries: list[str], clients: int, per_request: int, max_requests: int, max_s: float,
                during: Callable[[], None] | None = None) -> tuple[dict[str, float], list[str]]:
    """``clients`` threads, each sending its next request when the previous answered, until ``max_requests`` or
    ``max_s``; ``during`` runs in the middle of the load. Returns the summary and the answering versions."""
    lock = threading.Lock()
    latencies: list[float] = []
    versions: list[str] = []
    errors = [0]
    sent = [0]
    deadline = time.monotonic() + max_s

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    n = sent[0]
                    sent[0] += 1
                batch = [{"text": queries[(n * per_request + j) % len(queries)]} for j in range(per_request)]
                start_t = time.perf_counter()
                try:
                    response = http.post("/v1/predict", json={"queries": batch, "k": K})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - start_t
                with lock:
                    if ok:
                        latencies.append(took)
                        versions.append(response.json()["version"])
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        time.sleep(min(max_s / 3, 5))
        during()
    for t in threads:
        t.join()
    return summary(latencies, errors[0], time.perf_counter() - started, per_request), versions


def in_process(predictor: Predictor, queries: list[str], singles: int, batches: int) -> dict[str, Any]:
    for q in queries[:20]:  # warm-up: the model's first calls, the shard actors' first searches
        predictor.predict([Query(q)], K)
    predictor.predict([Query(q) for q in queries[:BATCH]], K)
    latencies = []
    start_t = time.perf_counter()
    for q in queries[:singles]:
        t = time.perf_counter()
        predictor.predict([Query(q)], K)
        latencies.append(time.perf_counter() - t)
    single = summary(latencies, 0, time.perf_counter() - start_t, 1)
    start_t = time.perf_counter()
    for b in range(batches):
        predictor.predict([Query(q) for q in queries[b * BATCH:(b + 1) * BATCH]], K)
    batched = batches * BATCH / (time.perf_counter() - start_t)
    return {"single": single, "queries_per_s_batched": round(batched, 2)}


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 labels, shorter loads (under 5 minutes)")
    parser.add_argument("--labels", type=int, help="label count (default 1,000,000; 100,000 with --quick)")
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--haproxy", action="store_true",
                        help="RAY_SERVE_ENABLE_HA_PROXY=1 (binds the replicas' HTTP ports on all interfaces)")
    args = parser.parse_args()
    if args.haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # read when Serve's modules load in the Ray workers
    num_labels = args.labels or (100_000 if args.quick else 1_000_000)
    load_s = 20.0 if args.quick else 60.0
    singles, batches = (100, 10) if args.quick else (400, 40)
    queries = titles(args.queries, seed=2)

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    port = free_port()
    cpus = os.cpu_count() or 2
    cfg = load_config(None, [
        "model.name_or_path=packaged:all-MiniLM-L6-v2", "model.max_length=32", f"index.num_shards={SHARDS}",
        f"index.cpus_per_shard={cpus / (2 * SHARDS)}", f"serve.encoder_num_cpus={cpus / 2}", f"serve.port={port}",
        "serve.poll_interval_s=1.0", "serve.max_batch_size=32", "serve.encoder_max_ongoing_requests=64",
        "serve.ingress_max_ongoing_requests=128", "serve.max_queued_requests=256", "infer.batch_size=64",
        f"infer.num_cpus_per_actor={cpus / 2}"])
    export = str(tmp / "export")
    build_embedder(cfg, None).save_export(export)
    index_dir = str(tmp / "index")
    started = time.perf_counter()
    write_version(index_dir, export, num_labels, seed=1)
    write_s = time.perf_counter() - started
    init_ray(num_cpus=cpus, local_only=True)
    result: dict[str, Any] = {"labels": num_labels, "shards": SHARDS, "k": K, "write_version_s": round(write_s, 1),
                              "vectors": "random unit (isotropic)", "proxy": "haproxy" if args.haproxy else "default"}

    torch.set_num_threads(max(1, int(cfg.serve.encoder_num_cpus)))  # the served encoder's threads
    with Predictor(export, index_dir, cfg) as predictor:
        result["in_process"] = in_process(predictor, queries, singles, batches)

    url = start(cfg, floor_application(), name="floor", route_prefix="/")
    closed_loop(url, queries, 4, 1, 50, 10)  # warm-up
    result["floor"] = {"c1": closed_loop(url, queries, 1, 1, singles, load_s)[0],
                       "c32": closed_loop(url, queries, 32, 1, 100_000, load_s)[0]}
    serve.delete("floor")

    url = start(cfg, application(export, index_dir, cfg), name="vixml", route_prefix="/")
    closed_loop(url, queries, 4, 1, 50, 10)  # warm-up
    c1, _ = closed_loop(url, queries, 1, 1, singles, load_s)
    swapped: dict[str, Any] = {}

    def swap() -> None:
        t = time.perf_counter()
        swapped["version"] = write_version(index_dir, export, num_labels, seed=3)
        swapped["write_s"] = round(time.perf_counter() - t, 1)

    c32, versions = closed_loop(url, queries, 32, 1, 100_000, load_s * 2, during=swap)
    batched, _ = closed_loop(url, queries, 4, BATCH, 100_000, load_s)
    stop()
    result["served"] = {"c1": c1, "c32": c32, "batched_c4": batched,
                        "swap": {**swapped, "served_new": swapped.get("version") in versions,
                                 "versions_seen": sorted(set(versions))}}

    inproc = result["in_process"]
    floor = result["floor"]
    single_ceiling = 1 / (1 / inproc["single"]["qps"] + 1 / floor["c32"]["qps"])
    result.update({
        "qps_ratio": round(batched["queries_per_s"] / inproc["queries_per_s_batched"], 3),
        "single_qps_ratio": round(c32["qps"] / single_ceiling, 3),
        "c1_overhead_ms": round(c1["p50_ms"] - (inproc["single"]["p50_ms"] + floor["c1"]["p50_ms"]), 2),
        "p50_ms": c1["p50_ms"], "p99_ms": c1["p99_ms"],
        "errors": c1["errors"] + c32["errors"] + batched["errors"], "swap_errors": c32["errors"],
    })
    ray.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(main(), sort_keys=True), flush=True)
