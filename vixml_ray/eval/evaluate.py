"""The evaluation job: embed the test queries (Ray Data), retrieve from the sharded label index, score.

Per Ray Data batch of embedded test queries the driver asks the :class:`~vixml_ray.index.ShardedIndex` for the top
``eval.topk`` labels with the dataset's filter pairs of those rows excluded (removed from the predictions only, the
ground truth is untouched; the index fetches enough extra candidates). Metrics come from
:mod:`vixml_ray.eval.metrics` with inverse propensities from the TRAINING split's label counts
(``eval.propensity_a/b``), plus the contribution of each training-frequency decile of labels to P@k. Without an
``index_dir`` the labels are first refreshed into a temporary index under ``cache_dir`` (on a multi-node cluster
``cache_dir`` must then be shared storage, since Ray workers write the index). The test queries are embedded and
materialised in the object store before the shard actors start, so the embedding actors and the shards never
compete for the same CPUs or GPUs.

With ``infer.raa.enabled`` the predictions are retrieval-augmented (:mod:`vixml_ray.index.raa`): the index version
must hold the training-query embeddings (refresh with ``infer.raa.enabled=true``; the temporary refresh does), the
shards serve both parts, and the filter pairs are removed after the label and neighbour scores are combined. The
same index version serves evaluations with RAA on and off.

``eval.sample_size`` evaluates a uniform sample of that many test rows (seeded by ``eval.sample_seed``): only those
rows enter the embedding pipeline, and the metrics, the report and ``predictions.parquet`` cover them (at a million
labels an exact scan of every test row is hours on CPU shards; a stated sample of 100,000 is minutes).

The output directory (published atomically) holds ``metrics.json``, ``metrics.md``, ``metrics.png``,
``predictions.parquet`` (:data:`PREDICTIONS_SCHEMA`) and the resolved ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import scipy.sparse as sp

from vixml_ray import storage
from vixml_ray.config import Config, save_config
from vixml_ray.data.dataset import Dataset, open_dataset
from vixml_ray.data.filters import rows_pairs
from vixml_ray.errors import ConfigError, IncompatibleArtifactError, OutputExistsError
from vixml_ray.eval.metrics import inverse_propensity_of_counts, xmc_metrics
from vixml_ray.eval.report import write_report
from vixml_ray.index import ShardedIndex, read_manifest
from vixml_ray.index.raa import LexicalTerm, search_labels, served_parts
from vixml_ray.index.refresh import refresh_labels
from vixml_ray.index.versions import check_embedded_by
from vixml_ray.index.tables import train_label_matrix
from vixml_ray.index.versions import QUERIES
from vixml_ray.ray_utils import init_ray_for
from vixml_ray.inference.batch import embed_split
from vixml_ray.inference.export import Export, absolute_uri, feature_cache, read_export
from vixml_ray.model.lexical import LexicalHead

# ``<eval out>/predictions.parquet``: the ranked labels of each test row after the filter pairs were removed, best first.
PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),  # test item row
        pa.field("labels", pa.list_(pa.int64()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
    ]
)

METRICS_FILE, PREDICTIONS_FILE, CONFIG_FILE = "metrics.json", "predictions.parquet", "config.yaml"
NUM_DECILES = 10


# ---------------------------------------------------------------------------------------------------- retrieval
def index_top_k(cfg: Config, dataset: Dataset, queries: ray.data.Dataset, index: ShardedIndex,
                train_labels: sp.csr_matrix | None = None, rows: np.ndarray | None = None,
                lexical: LexicalHead | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``eval.topk`` (ids int64, scores float32) of the test ``rows`` (sorted; default all) in that order, from
    the embedded ``queries`` ({row, embedding}) of those rows, filter pairs removed; -1/-inf padding. With
    ``infer.raa.enabled`` the search is retrieval-augmented (``train_labels``: the index version's training label
    matrix); a ``lexical`` head re-ranks the candidates by the rows' texts.

    The training loop's ``test_*`` metrics (:func:`vixml_ray.train.validation.validation_metrics`) score the same
    rows with the same propensities but rank by a brute-force torch top-k without RAA, so on an approximate index,
    with RAA or on tied scores the two may differ."""
    rows_all = np.arange(dataset.num_test, dtype=np.int64) if rows is None else rows
    n, topk = len(rows_all), cfg.eval.topk
    ids = np.full((n, topk), -1, dtype=np.int64)
    scores = np.full((n, topk), -np.inf, dtype=np.float32)
    pairs = dataset.filter_pairs()
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    seen = np.zeros(n, dtype=bool)
    texts = dataset.texts("test") if lexical is not None else None
    for batch in queries.iter_batches(batch_size=cfg.infer.rows_per_batch, batch_format="numpy"):
        rows = np.asarray(batch["row"], dtype=np.int64)
        at = np.searchsorted(rows_all, rows)
        if not np.array_equal(rows_all[np.minimum(at, n - 1)], rows):
            raise RuntimeError("embedded test rows outside the evaluated rows")
        term = LexicalTerm.of(lexical, [texts[row] for row in rows]) if lexical is not None else None
        result = search_labels(index, batch["embedding"], topk, cfg.infer.raa, lambda _: train_labels,
                               rows_pairs(pairs, rows), term)
        ids[at], scores[at] = result.ids, result.scores
        seen[at] = True
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} test queries came back without predictions")
    return ids, scores


# ------------------------------------------------------------------------------------------------------ scoring
def precision_by_decile(ids: np.ndarray, truth: sp.csr_matrix, train_counts: np.ndarray, k: int,
                        deciles: int = NUM_DECILES) -> list[dict[str, Any]]:
    """Each label-frequency decile's contribution to P@k (they sum to P@k): labels sorted by training count,
    most frequent first, cut into ``deciles`` groups of equal label count; a decile's value is P@k with every
    prediction outside it counted as no prediction."""
    num_labels = len(train_counts)
    order = np.argsort(-train_counts, kind="stable")
    group = np.empty(num_labels, dtype=np.int64)
    group[order] = np.arange(num_labels) * deciles // max(num_labels, 1)
    out = []
    for d in range(deciles):
        members = np.flatnonzero(group == d)
        inside = (ids >= 0) & (group[np.maximum(ids, 0)] == d)
        p_at_k = xmc_metrics(np.where(inside, ids, -1), truth, k)["P"][k - 1] if len(members) else 0.0
        out.append({"decile": d + 1, "labels": int(len(members)),
                    "min_count": int(train_counts[members].min()) if len(members) else 0,
                    "max_count": int(train_counts[members].max()) if len(members) else 0,
                    f"P@{k}": float(p_at_k)})
    return out


def score(cfg: Config, dataset: Dataset, ids: np.ndarray, rows: np.ndarray | None = None) -> dict[str, Any]:
    """P, nDCG, PSP, PSnDCG, R at 1..eval.k and P@k by label-frequency decile of the predictions ``ids`` of the test
    ``rows`` (default all)."""
    k = cfg.eval.k
    train_counts = dataset.label_counts("train")
    truth = dataset.label_matrix("test", rows)
    inv = inverse_propensity_of_counts(train_counts, dataset.num_train, cfg.eval.propensity_a, cfg.eval.propensity_b)
    at_k = {name: [float(x) for x in values] for name, values in xmc_metrics(ids, truth, k, inv).items()}
    return {
        "k": k,
        "metrics": {f"{name}@{j + 1}": values[j] for name, values in at_k.items() for j in range(k)},
        "at_k": at_k,
        "deciles": precision_by_decile(ids, truth, train_counts, k),
        "propensity": {"a": cfg.eval.propensity_a, "b": cfg.eval.propensity_b, "from": "train label counts"},
    }


# ------------------------------------------------------------------------------------------------------ outputs
def _predictions_table(rows: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    keep = ids >= 0
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return pa.Table.from_arrays([
        pa.array(rows, pa.int64()),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[keep])),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[keep].astype(np.float32))),
    ], schema=PREDICTIONS_SCHEMA)


def read_predictions(out_uri: str) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(rows, ranked label ids per row, their scores) from an evaluation output directory."""
    fs, path = storage.filesystem(storage.join(storage.resolve(out_uri), PREDICTIONS_FILE))
    table = pq.read_table(path, filesystem=fs)
    return (table.column("row").to_numpy(), [np.asarray(x, dtype=np.int64) for x in table.column("labels").to_pylist()],
            [np.asarray(x, dtype=np.float32) for x in table.column("scores").to_pylist()])


@contextlib.contextmanager
def _label_index(cfg: Config, export: Export, dataset: Dataset, index_dir: str | None) -> Iterator[tuple[str, Any]]:
    """The given index, or a fresh refresh into a temporary index under ``cache_dir`` (removed afterwards)."""
    if index_dir is not None:
        yield absolute_uri(index_dir), None
        return
    temporary = storage.join(absolute_uri(cfg.cache_dir), f"eval-index-{uuid.uuid4().hex[:12]}")
    try:
        yield temporary, refresh_labels(export.uri, dataset.uri, temporary, cfg)
    finally:
        with contextlib.suppress(Exception):
            storage.remove(temporary)


def evaluate(export_uri: str, dataset_uri: str, out_uri: str, index_dir: str | None = None, cfg: Config | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Evaluates the export on the dataset's test split; writes the outputs to ``out_uri``; returns the summary."""
    started = time.perf_counter()
    export = read_export(export_uri)
    cfg = cfg or export.cfg
    if cfg.eval.topk < cfg.eval.k:
        raise ConfigError(f"'eval.topk'={cfg.eval.topk} must be at least 'eval.k'={cfg.eval.k}")
    if storage.exists(out_uri) and not overwrite:
        raise OutputExistsError(out_uri)
    init_ray_for(cfg)
    dataset = open_dataset(absolute_uri(dataset_uri))
    features = feature_cache(cfg, export, dataset)
    with _label_index(cfg, export, dataset, index_dir) as (index_uri, refresh):
        manifest = read_manifest(index_uri)
        check_embedded_by(manifest, export, index_uri)
        if manifest.num_labels != dataset.num_labels:
            raise IncompatibleArtifactError(f"index version {manifest.version} of {index_uri} holds "
                                            f"{manifest.num_labels} labels, the dataset {dataset.uri} has "
                                            f"{dataset.num_labels}")
        parts = served_parts(cfg.infer.raa, manifest, index_uri)
        train_labels = train_label_matrix(index_uri, manifest) if QUERIES in parts else None
        rows = dataset.sample_rows("test", cfg.eval.sample_size, cfg.eval.sample_seed)
        keep = None
        if len(rows) < dataset.num_test:
            keep = np.zeros(dataset.num_test, dtype=bool)
            keep[rows] = True
        t0 = time.perf_counter()
        queries = embed_split(cfg, export, dataset, "test", features, keep=keep).materialize()
        t1 = time.perf_counter()
        with ShardedIndex(index_uri, cfg.index, manifest.version, parts) as index:
            ids, scores = index_top_k(cfg, dataset, queries, index, train_labels, rows, export.lexical_head())
        t2 = time.perf_counter()
    result = {
        **score(cfg, dataset, ids, rows),
        "counts": {"queries": len(rows), "test_items": dataset.num_test, "labels": dataset.num_labels,
                   "filter_pairs": int(len(dataset.filter_pairs())), "topk": cfg.eval.topk},
        "index": {"dir": None if index_dir is None else index_uri, "version": manifest.version,
                  "temporary": index_dir is None},
        "raa": dataclasses.asdict(cfg.infer.raa),
        "lexical": dataclasses.asdict(cfg.model.lexical) if export.meta.get("lexical") else None,
        "export": export.identity(),
        "dataset": {"uri": dataset.uri, "content_hash": dataset.manifest.get("content_hash")},
        "timing": {"embed_s": round(t1 - t0, 3), "search_s": round(t2 - t1, 3),
                   "queries_per_s": round(len(rows) / (t2 - t0), 2), "refresh": refresh},
        "sample": {"size": cfg.eval.sample_size, "seed": cfg.eval.sample_seed} if keep is not None else None,
    }
    with storage.publish(out_uri, overwrite=overwrite) as staging:
        storage.write_json(storage.join(staging, METRICS_FILE), result)
        storage.write_parquet(storage.join(staging, PREDICTIONS_FILE), _predictions_table(rows, ids, scores))
        write_report(result, staging)
        save_config(cfg, storage.join(staging, CONFIG_FILE))
    k = cfg.eval.k
    shown = [f"{name}@{j}" for name in ("P", "nDCG", "PSP", "PSnDCG", "R") for j in sorted({1, 3, k}) if j <= k]
    return {**{m: round(result["metrics"][m], 6) for m in shown}, "queries": len(rows),
            "queries_per_s": result["timing"]["queries_per_s"], "version": manifest.version,
            "raa": cfg.infer.raa.enabled,
            "seconds": round(time.perf_counter() - started, 2), "out": out_uri}
