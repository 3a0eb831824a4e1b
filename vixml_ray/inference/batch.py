"""Embedding a dataset split (labels for the index, test queries for evaluation) with a trained export in Ray Data.

``read_parquet(split: row, text) -> [keep rows] -> BatchEmbedder (actor pool, one model per actor) -> (row,
embedding)``. Actors load the export once; each batch is tokenised (as in training: no special tokens, truncated to
``model.max_length``), joined with its image features from the dataset's feature bank and embedded in model batches
of ``infer.batch_size`` rows, sorted by length inside the Ray Data batch of ``infer.rows_per_batch`` rows.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from vixml_ray import storage
from vixml_ray.config import Config, InferConfig
from vixml_ray.data.dataset import Dataset
from vixml_ray.devices import actor_device
from vixml_ray.errors import ConfigError
from vixml_ray.model.embedder import load_export
from vixml_ray.model.inference import array_images, embed_arrays
from vixml_ray.model.tokens import tokenize
from vixml_ray.inference.export import Export, FeatureCache, export_fingerprint


class BatchEmbedder:
    """Ray Data actor: ``{row, text}`` batches of ``split`` -> ``{row, embedding float32 [B, hidden]}``; for labels,
    the vectors they are scored with (PRIME prototypes when the export has them)."""

    def __init__(self, export_uri: str, fingerprint: str, split: str, infer: InferConfig,
                 dataset_uri: str | None = None, feature_slug: str | None = None):
        if export_fingerprint(export_uri) != fingerprint:
            raise RuntimeError(f"the export at {export_uri} changed while the job ran (fingerprint mismatch)")
        device = actor_device(infer.num_gpus_per_actor, "infer.num_gpus_per_actor")
        if device.type == "cpu":
            torch.set_num_threads(infer.actor_threads or max(1, int(infer.num_cpus_per_actor)))
        self.embedder = load_export(export_uri).to(device).eval()
        self.split = split
        self.batch_size = infer.batch_size
        self.bank = None
        if feature_slug is not None:
            from vixml_ray.vision.bank import FeatureBank

            self.bank = FeatureBank.open(dataset_uri, feature_slug)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["row"], dtype=np.int64)
        tokens = tokenize(self.embedder.tokenizer, [str(t) for t in batch["text"]], self.embedder.cfg.model.max_length)
        feats = mask = None
        if self.bank is not None:
            feats, mask = (t.numpy() for t in self.bank.get(self.split, rows))
        embeddings = embed_arrays(self.embedder, tokens, array_images(feats, mask), batch_size=self.batch_size,
                                  label_ids=rows if self.split == "label" else None)
        return {"row": rows, "embedding": embeddings}


def _keep_rows(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    selected = keep[np.asarray(batch["row"], dtype=np.int64)]
    return {k: np.asarray(v)[selected] for k, v in batch.items()}


def embed_split(cfg: Config, export: Export, dataset: Dataset, split: str, features: FeatureCache | None,
                keep: np.ndarray | None = None) -> ray.data.Dataset:
    """A (lazy) Ray Data dataset of ``{row, embedding}`` for the rows of ``split`` (only where ``keep[row]``, a
    bool mask over the split, when given), in no particular order."""
    infer = cfg.infer
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if infer.num_gpus_per_actor == 0 and infer.num_cpus_per_actor * infer.min_actors >= cpus:
        raise ConfigError(f"'infer.num_cpus_per_actor'={infer.num_cpus_per_actor} x 'infer.min_actors'="
                          f"{infer.min_actors} takes every CPU of the Ray cluster ({cpus:g}): the read and write "
                          "tasks of the pipeline could never run; leave at least one CPU")
    fs, path = storage.filesystem(dataset.file_uri(split))
    ds = ray.data.read_parquet(path, filesystem=fs, columns=["row", "text"])
    if keep is not None:
        ds = ds.map_batches(_keep_rows, fn_kwargs={"keep": np.asarray(keep, dtype=bool)}, batch_format="numpy")
    return ds.map_batches(
        BatchEmbedder,
        fn_constructor_kwargs={"export_uri": export.uri, "fingerprint": export.fingerprint, "split": split,
                               "infer": infer, "dataset_uri": dataset.uri,
                               "feature_slug": features.slug if features is not None else None},
        batch_size=infer.rows_per_batch,
        batch_format="numpy",
        num_cpus=infer.num_cpus_per_actor,
        num_gpus=infer.num_gpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=infer.min_actors, max_size=infer.max_actors),
    )
