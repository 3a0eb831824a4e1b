"""The online predictor: raw queries (text + images) -> top-k labels (ids, names, scores) from the sharded index.

A query's images (bytes, paths, URIs or URLs; slot order kept, at most 3) go through the export's vision tower into
the feature-cache representation (:class:`~vixml_ray.inference.images.ImageFeaturizer`), its text is tokenised as in
training, and the trained model embeds both; the :class:`~vixml_ray.index.ShardedIndex` returns the top k. The
predictor refuses an index version embedded by another export, or whose label image features came from another
vision model than the export's, and reads label names from the answering version's ``labels.parquet``, so the
names always match the version that answered (also across :meth:`Predictor.swap`).

With ``infer.raa.enabled`` the scores are retrieval-augmented (:mod:`vixml_ray.index.raa`) exactly as in
:func:`vixml_ray.eval.evaluate.evaluate`: the shards also serve the version's training queries, and a batch's label
search, neighbour search and training label matrix all come from one version.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from vixml_ray.config import Config
from vixml_ray.devices import actor_device
from vixml_ray.errors import IncompatibleArtifactError
from vixml_ray.index import Manifest, ShardedIndex, read_manifest
from vixml_ray.index.raa import LexicalTerm, search_labels, served_parts
from vixml_ray.index.versions import check_embedded_by
from vixml_ray.index.tables import read_labels, train_label_matrix
from vixml_ray.model.embedder import load_export
from vixml_ray.model.inference import array_images, embed_arrays
from vixml_ray.model.tokens import tokenize
from vixml_ray.inference.export import Export, absolute_uri, check_feature_model, read_export
from vixml_ray.inference.images import ImageFeaturizer, ImageInput
from vixml_ray.vision.fetch import fetch_options

T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    text: str
    images: Sequence[ImageInput] = ()  # raw bytes or paths/URIs/URLs, in slot order


@dataclass
class Prediction:
    ids: list[int]  # label rows, best first
    names: list[str]  # label texts
    scores: list[float]  # inner products of unit vectors (retrieval-augmented with infer.raa.enabled; plus the
    # lexical head's term with model.lexical.enabled)
    version: str  # the index version that answered
    image_errors: list[str | None] = field(default_factory=list)  # per given image: why it was masked, or None


def check_version(manifest: Manifest, export: Export, cfg: Config, index_dir: str) -> None:
    """Raises unless ``export`` may answer from this index version: its labels were embedded by the export, it holds
    every part ``cfg`` needs (training queries for RAA), and its label image features came from the export's vision
    model in the cache dtype."""
    check_embedded_by(manifest, export, index_dir)
    served_parts(cfg.infer.raa, manifest, index_dir)  # RAA needs the training queries
    if export.uses_images:
        features = manifest.identity.get("features") or {}
        where = f"index version {manifest.version} of {index_dir}"
        check_feature_model(features.get("model", {}), cfg, where)
        if features.get("dtype") != cfg.vision.cache_dtype:
            raise IncompatibleArtifactError(f"{where}: label image features in {features.get('dtype')}, the "
                                            f"export's 'vision.cache_dtype' is {cfg.vision.cache_dtype}")


class QueryEncoder:
    """The trained model and (image models) the vision tower: raw queries -> unit query embeddings."""

    def __init__(self, export: Export, cfg: Config, base_uri: str | None = None):
        self.cfg = cfg
        device = actor_device(cfg.infer.num_gpus_per_actor, "infer.num_gpus_per_actor")
        self.embedder = load_export(export.uri).to(device).eval()
        fetch = fetch_options(cfg, absolute_uri(base_uri or os.getcwd()))
        self.images = ImageFeaturizer(cfg.vision, fetch) if export.uses_images else None
        if self.images is not None and self.images.dim != export.image_dim:
            raise IncompatibleArtifactError(f"the vision tower gives {self.images.dim}-d features, the export "
                                            f"expects {export.image_dim}")

    def embed(self, queries: Sequence[Query]) -> tuple[np.ndarray, list[list[str | None]]]:
        """Unit query embeddings float32 [n, hidden] and, per query, why each of its images was masked (or None)."""
        feats = mask = None
        errors: list[list[str | None]] = [[] for _ in queries]
        if self.images is not None:
            feats, mask, errors = self.images.features([q.images for q in queries])
        tokens = tokenize(self.embedder.tokenizer, [q.text for q in queries], self.embedder.cfg.model.max_length)
        images = array_images(feats, mask)
        return embed_arrays(self.embedder, tokens, images, batch_size=self.cfg.infer.batch_size), errors


class Predictor:
    """Holds the trained model, the vision tower (image models) and a sharded index over ``index_dir``.

    ``cfg``: the job config (default: the export's; see :func:`vixml_ray.inference.export.job_config`); ``base_uri``:
    where relative image paths are resolved (default: the working directory). Needs Ray initialised.
    """

    def __init__(self, export_uri: str, index_dir: str, cfg: Config | None = None, base_uri: str | None = None):
        self.export = read_export(export_uri)
        self.cfg = cfg or self.export.cfg
        self.index_dir = absolute_uri(index_dir)
        manifest = read_manifest(self.index_dir)
        self._check(manifest)
        self.encoder = QueryEncoder(self.export, self.cfg, base_uri)
        self.lexical = self.export.lexical_head()
        self._per_version: dict[tuple[str, str], object] = {}
        self._cache_lock = threading.Lock()
        self.index = ShardedIndex(self.index_dir, self.cfg.index, manifest.version,
                                  served_parts(self.cfg.infer.raa, manifest, self.index_dir))

    def _check(self, manifest: Manifest) -> None:
        check_version(manifest, self.export, self.cfg, self.index_dir)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def swap(self, version: str | None = None) -> str:
        """Serves ``version`` (default: the ``CURRENT`` one) after checking it; in-flight queries finish on the old."""
        manifest = read_manifest(self.index_dir, version)
        self._check(manifest)
        return self.index.swap(manifest.version)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------------- queries
    def embed(self, queries: Sequence[Query]) -> tuple[np.ndarray, list[list[str | None]]]:
        """See :meth:`QueryEncoder.embed`."""
        return self.encoder.embed(queries)

    def _cached(self, what: str, version: str, load: Callable[[], T]) -> T:
        """``load()`` of a version's ``what``, kept for the two most recent versions."""
        with self._cache_lock:
            key = (what, version)
            if key not in self._per_version:
                self._per_version[key] = load()
                for old in [k for k in self._per_version if k[0] == what][:-2]:
                    del self._per_version[old]
            return self._per_version[key]  # type: ignore[return-value]

    def label_names(self, version: str) -> pa.Array:
        """The label texts of an index version, by row."""
        return self._cached("names", version, lambda: read_labels(self.index_dir, version, ["text"]).column(
            "text").combine_chunks())

    def train_labels(self, manifest: Manifest) -> sp.csr_matrix:
        """The (training queries x labels) matrix of an index version (retrieval-augmented inference)."""
        return self._cached("train_labels", manifest.version, lambda: train_label_matrix(self.index_dir, manifest))

    def predict(self, queries: Sequence[Query], k: int) -> list[Prediction]:
        """The top ``k`` labels of every query (fewer when the index holds fewer labels)."""
        if not queries:
            return []
        embeddings, errors = self.embed(queries)
        result = search_labels(self.index, embeddings, k, self.cfg.infer.raa, self.train_labels,
                               lexical=LexicalTerm.of(self.lexical, [q.text for q in queries]))
        names = self.label_names(result.version)
        out = []
        for ids, scores, image_errors in zip(result.ids, result.scores, errors):
            valid = ids >= 0
            ids = ids[valid]
            out.append(Prediction(ids.tolist(), names.take(pa.array(ids)).to_pylist(), scores[valid].tolist(),
                                  result.version, image_errors))
        return out
