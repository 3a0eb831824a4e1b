"""The Ray Serve application: a FastAPI ingress in front of a batched query encoder and one deployment per index
shard, built by :func:`build` (``serve run vixml_ray.serve.app:build checkpoint=EXPORT index=INDEX_DIR [key=value]``,
extra keys being dotted config overrides such as ``serve.shard_replicas=2``) or :func:`application` (Python).

Request path: the ingress validates the request (:mod:`vixml_ray.serve.api`), reads its images
(:mod:`vixml_ray.serve.images`), has the encoder embed the queries, and runs the same label search as
:func:`vixml_ray.eval.evaluate.evaluate` (:func:`vixml_ray.index.raa.search_labels` over an
:class:`~vixml_ray.index.sharded.IndexView` whose shard calls go to the shard deployments), so the per-shard top-k
are merged exactly by (-score, id) and ``infer.raa.enabled`` applies as there, as does the export's lexical head
(``model.lexical``, held by the ingress: it re-ranks the candidates by the request's texts). One request is answered entirely by
the index version it started on; a shard or encoder call that fails is retried once (Serve routes it to another
replica), then the request gets 503, as it does at once while a deployment has no running replica (its only one
died and Serve is replacing it, see :mod:`vixml_ray.serve.calls`).

Versions: a thread polls the index's ``CURRENT`` every ``serve.poll_interval_s`` (or serves the version pinned by
the ingress deployment's ``user_config: {version: vN}``, which the builder's ``version=vN`` sets; a ``serve deploy``
that changes only that user_config switches the live replicas without restarting them, see
:meth:`Ingress.reconfigure`). A new version is checked
(:func:`vixml_ray.predict.predictor.check_version`: embedded by this export, holding the parts the config needs),
its label names and RAA matrix are read, every shard deployment loads it, and only then do new requests use it. A
refused version is logged and listed by ``/v1/version``; the old version keeps serving.
"""

# no "from __future__ import annotations": FastAPI must see the route parameters' real types through Serve's wrapper

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from vixml_ray.config import Config
from vixml_ray.errors import ConfigError
from vixml_ray.index.raa import LexicalTerm, search_labels, served_parts
from vixml_ray.index.sharded import Generation, IndexView, SearchResult, shard_bounds
from vixml_ray.index.tables import read_labels, train_label_matrix
from vixml_ray.index.versions import Manifest, current_version, read_manifest
from vixml_ray.inference.export import Export, absolute_uri, job_config, read_export
from vixml_ray.predict.predictor import check_version
from vixml_ray.serve import api
from vixml_ray.serve.calls import HEALTH_CHECK_PERIOD_S, Caller, Unavailable
from vixml_ray.serve.encoder import Encoder
from vixml_ray.serve.images import ImageRefused, read_image
from vixml_ray.serve.shards import ShardReplica

log = logging.getLogger(__name__)

MAX_REFUSALS = 10  # refusals kept for /v1/version
TEXT_ONLY = "ignored: the model reads text only"  # image_errors of every image sent to a text-only model

app = FastAPI(title="vixml-ray", version="1", summary="Extreme multi-label scoring of text + image queries",
              docs_url="/docs", redoc_url=None)


class ServedView(IndexView):
    """An :class:`IndexView` of one version whose shard calls go to the shard deployments (through ``call``)."""

    def __init__(self, gen: Generation, timeout_s: float, pool: ThreadPoolExecutor, call: Caller):
        super().__init__(gen)
        self._timeout_s, self._pool, self._call = timeout_s, pool, call

    def _fanout(self, method: str, queries: np.ndarray, calls: dict[int, tuple[Any, ...]]) -> list[Any]:
        futures = [self._pool.submit(self._call, self._gen.actors[s], method, self._timeout_s, self.version,
                                     queries, *args) for s, args in calls.items()]
        return [f.result() for f in futures]


class _PinnedIndex:
    """What :func:`~vixml_ray.index.raa.search_labels` needs of an index, for one already-pinned view."""

    def __init__(self, view: ServedView):
        self.view = view

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> SearchResult:
        return self.view.search(queries, k, exclude)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[ServedView]:
        yield self.view


@dataclass(frozen=True)
class Served:
    """One index version as the ingress serves it."""

    manifest: Manifest
    gen: Generation  # the shard deployments and each part's row ranges
    names: pa.Array  # label text by row
    uids: pa.Array  # label uid by row
    train_labels: sp.csr_matrix | None  # RAA's training label matrix


@serve.ingress(app)
class Ingress:
    """The FastAPI ingress: routes below, schemas and request checks in :mod:`vixml_ray.serve.api`."""

    def __init__(self, encoder: DeploymentHandle, shards: list[DeploymentHandle], export_uri: str,
                 index_dir: str, cfg: Config, version: str, pinned: bool):
        """Serves ``version`` first; ``pinned``: it is also the deployment's ``user_config`` pin, held from the
        start so that the poller never moves off it before Serve calls :meth:`reconfigure`."""
        self.encoder, self.shards, self.cfg, self.index_dir = encoder, shards, cfg, index_dir
        self.export: Export = read_export(export_uri)
        self.lexical = self.export.lexical_head()  # the sparse lexical head (model.lexical), held by the ingress
        self.api_key = api.api_key(cfg.serve)
        self.pool = ThreadPoolExecutor(max_workers=max(8, 2 * len(shards)), thread_name_prefix="fanout")
        self.refusals: list[dict[str, Any]] = []
        self.pinned: str | None = version if pinned else None
        self._switch_lock = threading.Lock()
        self.served: Served = self._load(read_manifest(index_dir, version))
        self._stop = threading.Event()
        self.call = Caller(serve.get_replica_context().app_name, self._stop)
        self._poller = threading.Thread(target=self._poll, name="version-poller", daemon=True)
        self._poller.start()

    # ------------------------------------------------------------------------------------------------ versions
    def _load(self, manifest: Manifest) -> Served:
        labels = read_labels(self.index_dir, manifest.version, ["uid", "text"])
        parts = served_parts(self.cfg.infer.raa, manifest, self.index_dir)
        edges = {p: np.array([lo for lo, _ in b] + [b[-1][1]], dtype=np.int64)
                 for p in parts for b in [shard_bounds(manifest.num_rows(p), len(self.shards))]}
        y = train_label_matrix(self.index_dir, manifest) if self.cfg.infer.raa.enabled else None
        return Served(manifest, Generation(manifest, list(self.shards), edges),
                      labels.column("text").combine_chunks(), labels.column("uid").combine_chunks(), y)

    def switch(self, version: str) -> bool:
        """Serves ``version`` once it passes the checks and every shard deployment has loaded it; False (logged,
        listed by ``/v1/version``) when refused, and the old version keeps serving."""
        with self._switch_lock:
            if version == self.served.manifest.version:
                return True
            try:
                manifest = read_manifest(self.index_dir, version)
                check_version(manifest, self.export, self.cfg, self.index_dir)
                served = self._load(manifest)
                calls = [self.pool.submit(self.call, shard, "prepare", self.cfg.index.load_timeout_s, version)
                         for shard in self.shards for _ in range(self.cfg.serve.shard_replicas)]
                for call in calls:
                    call.result()
            except (ValueError, FileNotFoundError) as err:
                self._refuse(version, err, final=True)
                return False
            except Unavailable as err:  # a shard could not load it now: the next poll tries again
                self._refuse(version, err, final=False)
                return False
            old, self.served = self.served.manifest.version, served
            log.info("switched from index version %s to %s", old, version)
            return True

    def _refuse(self, version: str, err: Exception, final: bool) -> None:
        """Records why ``version`` is not served; a ``final`` refusal is not retried by the poller."""
        if any(r["version"] == version and r["reason"] == str(err) for r in self.refusals):
            return
        log.error("refused index version %s of %s: %s", version, self.index_dir, err)
        self.refusals = [*self.refusals, {"version": version, "reason": str(err), "final": final,
                                          "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}][-MAX_REFUSALS:]

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.serve.poll_interval_s):
            try:
                target = self.pinned or current_version(self.index_dir)
                refused = {r["version"] for r in self.refusals if r["final"]}
                if target and target != self.served.manifest.version and target not in refused:
                    self.switch(target)
            except Exception:  # noqa: BLE001 - a storage hiccup must not end polling
                log.exception("polling %s failed", self.index_dir)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config``: ``{"version": "vN"}`` serves that version (an explicit switch, same checks);
        ``{"version": null}`` (or no key) follows ``CURRENT`` again. Serve calls it after ``__init__`` and on a
        redeploy that changes the user_config; removing the user_config calls nothing (the pin stays)."""
        unknown = set(user_config) - {"version"}
        if unknown:
            raise ConfigError(f"unknown user_config keys {sorted(unknown)} (known: version)")
        self.pinned = user_config.get("version")
        if self.pinned:
            self.refusals = [r for r in self.refusals if r["version"] != self.pinned]  # asked again: retry
            await asyncio.to_thread(self.switch, self.pinned)

    def __del__(self) -> None:
        self._stop.set()

    # -------------------------------------------------------------------------------------------------- queries
    def answer(self, queries: Sequence[api.QueryIn], k: int) -> dict[str, Any]:
        """The top ``k`` labels of every query (see :class:`vixml_ray.serve.api.PredictOut`)."""
        served = self.served  # one version answers the whole request
        specs = [(q, s) for q, query in enumerate(queries) for s in range(len(query.images))
                 if self.export.uses_images]
        read = list(self.pool.map(self._read_image, [queries[q].images[s] for q, s in specs]))
        images: list[list[bytes]] = [[b""] * len(query.images) for query in queries]
        refused: dict[tuple[int, int], str] = {}
        for (q, s), got in zip(specs, read):
            if isinstance(got, ImageRefused):
                refused[(q, s)] = got.reason  # sent as b"": its slot stays masked
            else:
                images[q][s] = got
        embeddings, errors = self.call(self.encoder, "embed", self.cfg.serve.request_timeout_s,
                                       [(query.text, images[i]) for i, query in enumerate(queries)])
        for (q, s), reason in refused.items():
            errors[q][s] = reason
        if not self.export.uses_images:
            errors = [[TEXT_ONLY] * len(query.images) for query in queries]
        view = ServedView(served.gen, self.cfg.serve.request_timeout_s, self.pool, self.call)
        result = search_labels(_PinnedIndex(view), embeddings, k, self.cfg.infer.raa,
                               lambda manifest: served.train_labels,
                               lexical=LexicalTerm.of(self.lexical, [q.text for q in queries]))
        results = []
        for ids, scores, image_errors in zip(result.ids, result.scores, errors):
            ids = ids[ids >= 0]
            taken = pa.array(ids, type=pa.int64())
            results.append({"labels": [{"row": int(row), "uid": uid, "name": name, "score": float(score)}
                                       for row, uid, name, score in zip(
                                           ids, served.uids.take(taken).to_pylist(),
                                           served.names.take(taken).to_pylist(), scores)],
                            "image_errors": image_errors})
        return {"version": result.version, "results": results}

    def _read_image(self, spec: str) -> bytes | ImageRefused:
        try:
            return read_image(spec, self.cfg.serve)
        except ImageRefused as err:
            return err

    def health_info(self) -> dict[str, Any]:
        """Raises :class:`Unavailable` unless the encoder and every shard answer (shards: for the served version)."""
        timeout = self.cfg.serve.request_timeout_s
        if self.call(self.encoder, "fingerprint", timeout) != self.export.fingerprint:
            raise Unavailable("the encoder serves another export")
        version = self.served.manifest.version
        calls = [self.pool.submit(self.call, shard, "prepare", timeout, version) for shard in self.shards]
        return {"status": "ok", "version": version, "shards": [c.result()["ntotal"] for c in calls]}

    def version_info(self) -> dict[str, Any]:
        manifest = self.served.manifest
        return {"version": manifest.version, "num_labels": manifest.num_labels, "dim": manifest.dim,
                "created": manifest.created, "pinned": self.pinned, "refused": self.refusals,
                "export": {"fingerprint": self.export.fingerprint, "model": self.export.cfg.model.name_or_path,
                           "uses_images": self.export.uses_images},
                "raa": self.cfg.infer.raa.enabled}

    # --------------------------------------------------------------------------------------------------- routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(api.PAGE.read_text(encoding="utf-8"))

    @app.post("/v1/predict", response_model=api.PredictOut, openapi_extra=api.PREDICT_BODY,
              responses={401: {}, 413: {}, 422: {}, 503: {}})
    async def predict(self, request: Request) -> dict[str, Any]:
        """Top-k labels of each query (see vixml_ray.serve.api.PredictIn)."""
        api.authorize(request, self.api_key)
        body = await api.read_body(request, self.cfg.serve.max_body_bytes)
        parsed = api.parse_predict(body, self.cfg.serve)
        try:
            return await asyncio.to_thread(self.answer, parsed.queries, parsed.k)
        except Unavailable as err:
            raise HTTPException(503, f"temporarily unavailable: {err}") from None

    @app.get("/v1/health", responses={503: {}})
    async def health(self) -> JSONResponse:
        """200 when the encoder and every shard answer for the served version, else 503."""
        try:
            return JSONResponse(await asyncio.to_thread(self.health_info))
        except Unavailable as err:
            return JSONResponse({"status": "unavailable", "detail": str(err)}, status_code=503)

    @app.get("/v1/version")
    def version(self, request: Request) -> dict[str, Any]:
        """The index version served, the export's identity, the label count and refused versions."""
        api.authorize(request, self.api_key)
        return self.version_info()


def application(export_uri: str, index_dir: str, cfg: Config, version: str | None = None) -> serve.Application:
    """The bound Serve application over ``version`` of ``index_dir``, checked first. A given ``version`` is pinned
    (the ingress's ``user_config: {version: vN}``, see :meth:`Ingress.reconfigure`); None serves ``CURRENT`` and
    follows it."""
    export = read_export(export_uri)
    index_dir = absolute_uri(index_dir)
    manifest = read_manifest(index_dir, version)
    check_version(manifest, export, cfg, index_dir)
    parts = served_parts(cfg.infer.raa, manifest, index_dir)
    api.api_key(cfg.serve)  # a configured key must be set here too
    s, pinned = cfg.serve, version is not None
    shards = [serve.deployment(ShardReplica).options(
        name=f"shard-{i}", num_replicas=s.shard_replicas, max_ongoing_requests=s.shard_max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options={"num_cpus": cfg.index.cpus_per_shard, "num_gpus": 1 if cfg.index.use_gpu else 0},
    ).bind(index_dir, i, cfg.index.num_shards, parts, cfg.index, manifest.version)
        for i in range(cfg.index.num_shards)]
    scaling: dict[str, Any] = ({"autoscaling_config": {"min_replicas": s.encoder_min_replicas,
                                                       "max_replicas": s.encoder_max_replicas,
                                                       "target_ongoing_requests": s.encoder_target_ongoing_requests}}
                               if s.encoder_max_replicas > s.encoder_min_replicas
                               else {"num_replicas": s.encoder_min_replicas})
    encoder = serve.deployment(Encoder).options(
        name="encoder", max_ongoing_requests=s.encoder_max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options={"num_cpus": s.encoder_num_cpus, "num_gpus": s.encoder_num_gpus}, **scaling,
    ).bind(export.uri, cfg)
    env = {s.api_key_env: os.environ[s.api_key_env]} if s.api_key_env else {}
    ingress = serve.deployment(Ingress).options(
        name="ingress", num_replicas=s.ingress_replicas, max_ongoing_requests=s.ingress_max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.ingress_num_cpus, **({"runtime_env": {"env_vars": env}} if env else {})},
        **({"user_config": {"version": manifest.version}} if pinned else {}),
    )
    return ingress.bind(encoder, shards, export.uri, index_dir, cfg, manifest.version, pinned)


def build(args: dict[str, str]) -> serve.Application:
    """The builder of ``serve run vixml_ray.serve.app:build checkpoint=EXPORT index=INDEX_DIR [config=PRESET]
    [version=vN] [dotted.key=value ...]``: the export's config with the overrides (see
    :func:`vixml_ray.inference.export.job_config`)."""
    args = dict(args)
    missing = [key for key in ("checkpoint", "index") if key not in args]
    if missing:
        raise ConfigError(f"the builder needs the arguments {missing} (checkpoint=EXPORT index=INDEX_DIR)")
    checkpoint, index_dir = args.pop("checkpoint"), args.pop("index")
    config, version = args.pop("config", None), args.pop("version", None)
    cfg = job_config(checkpoint, config, [f"{key}={value}" for key, value in args.items()])
    return application(checkpoint, index_dir, cfg, version)
