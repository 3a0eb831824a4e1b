"""Stage glue the jobs share: make sure a config's dataset (and its image features) exist, then train.

A config with no ``data.dataset`` and no ``data.source`` is self-contained: its synthetic multimodal dataset is
generated on first use under ``<cache_dir>/datasets/`` (named by a hash of ``data.synthetic``) and, when the model
uses images, embedded with the configured vision tower; later runs reuse both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from typing import Any

from vixml_ray import storage
from vixml_ray.config import Config, replace
from vixml_ray.data.schema import MANIFEST
from vixml_ray.errors import MissingPathError
from vixml_ray.ray_utils import init_ray_for

log = logging.getLogger(__name__)


def synthetic_dataset_path(cfg: Config) -> str:
    key = hashlib.sha256(json.dumps(asdict(cfg.data.synthetic), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.abspath(os.path.join(cfg.cache_dir, "datasets", f"synthetic-{key}"))


def _is_prepared(dataset: str) -> bool:
    return storage.exists(storage.join(storage.resolve(dataset), MANIFEST))


def check_data_inputs(cfg: Config) -> None:
    """Fails fast, before Ray starts, when ``data.dataset`` is not a prepared dataset and ``data.source`` (to prepare
    it from) is unset or missing."""
    dataset = cfg.data.dataset
    if not dataset or _is_prepared(dataset):
        return
    if not cfg.data.source:
        raise MissingPathError(dataset, f"data.dataset={dataset} is not a prepared dataset and data.source is not set")
    storage.require(cfg.data.source, "data.source")


def ensure_dataset(cfg: Config) -> Config:
    """``cfg`` with ``data.dataset`` pointing at a prepared dataset that has the image features the model needs."""
    from vixml_ray.data import generate_synthetic, prepare_dataset

    dataset = cfg.data.dataset
    if not dataset:
        dataset = synthetic_dataset_path(cfg)
        if not storage.exists(storage.join(dataset, MANIFEST)):
            log.info("generating the synthetic dataset %s", dataset)
            generate_synthetic(dataset, cfg, fmt="dataset")
    elif not _is_prepared(dataset):
        check_data_inputs(cfg)
        prepare_dataset(cfg.data.source, dataset, cfg)
    cfg = replace(cfg, **{"data.dataset": dataset})
    if cfg.model.use_images and cfg.model.num_images > 0:
        from vixml_ray.vision.pipeline import embed_images

        embed_images(cfg, dataset, progress=False)  # resumable: a complete cache costs a check per shard
    return cfg


def run_training(cfg: Config, run_name: str = "train") -> dict[str, Any]:
    """The train job: Ray up, dataset and features present, then Ray Train (see :func:`vixml_ray.train.fit`)."""
    from vixml_ray.train.ray_train import fit

    init_ray_for(cfg)
    cfg = ensure_dataset(cfg)
    return fit(cfg, run_name=run_name)
