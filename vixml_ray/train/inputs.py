"""Everything a training worker reads: token arrays (tokenised once, cached on local disk), ground truth, the
train/validation split, propensities, and image features when the model uses images."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
import numpy as np
import scipy.sparse as sp
from transformers import PreTrainedTokenizerBase

from vixml_ray.config import Config
from vixml_ray.data.dataset import Dataset, open_dataset
from vixml_ray.errors import ConfigError, IncompatibleArtifactError
from vixml_ray.eval.metrics import inverse_propensity
from vixml_ray.model.tokens import TokenArrays, load_tokens, save_tokens, tokenize
from vixml_ray.train import dist
from vixml_ray.vision.bank import FeatureBank

log = logging.getLogger(__name__)


@dataclass
class TrainInputs:
    dataset: Dataset
    tokens: dict[str, TokenArrays]  # "train", "test", "label"
    train_labels: sp.csr_matrix  # [num_train x num_labels], all training rows
    test_labels: sp.csr_matrix
    train_rows: np.ndarray  # training rows used for training (the rest of TRAIN is validation)
    val_rows: np.ndarray
    inv_propensity: np.ndarray  # from the label counts of train_rows (propensity-weighted positive sampling)
    images: FeatureBank | None  # image features of train/test/label rows when the model uses images

    @property
    def image_dim(self) -> int | None:
        return self.images.dim if self.images is not None else None


def load_inputs(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> TrainInputs:
    """Opens ``cfg.data.dataset`` and tokenises its splits once into ``cfg.cache_dir`` (rank 0 first, then the
    others: on a shared cache they just read it, on per-node disks every node fills its own)."""
    if not cfg.data.dataset:
        raise ConfigError("'data.dataset' is not set: train needs a prepared dataset directory")
    dataset = open_dataset(cfg.data.dataset)
    def all_tokens() -> dict[str, TokenArrays]:
        return {split: cached_tokens(cfg, dataset, split, tokenizer) for split in ("train", "test", "label")}

    tokens = all_tokens() if dist.rank() == 0 else {}
    dist.barrier()
    if dist.rank() != 0:
        tokens = all_tokens()
    train_rows, val_rows = dataset.validation_rows(cfg.data, cfg.train.seed)
    train_labels = dataset.label_matrix("train")
    return TrainInputs(
        dataset=dataset,
        tokens=tokens,
        train_labels=train_labels,
        test_labels=dataset.label_matrix("test"),
        train_rows=train_rows,
        val_rows=val_rows,
        inv_propensity=inverse_propensity(train_labels[train_rows], cfg.eval.propensity_a, cfg.eval.propensity_b),
        images=open_images(cfg, dataset),
    )


def cached_tokens(cfg: Config, dataset: Dataset, split: str, tokenizer: PreTrainedTokenizerBase) -> TokenArrays:
    """The token arrays of ``split``, read from ``<cache_dir>/tokens/<key>/<split>`` or tokenised and saved there;
    the key covers the dataset's content hash, the tokenizer and ``model.max_length``."""
    key = json.dumps({
        "dataset": dataset.manifest.get("content_hash", dataset.uri),
        "tokenizer": cfg.model.name_or_path,
        "vocab": len(tokenizer),
        "max_length": cfg.model.max_length,
    }, sort_keys=True)
    directory = os.path.join(cfg.cache_dir, "tokens", hashlib.sha256(key.encode()).hexdigest()[:16], split)
    try:
        return load_tokens(directory)
    except FileNotFoundError:
        pass
    arrays = tokenize(tokenizer, dataset.texts(split), cfg.model.max_length)
    try:
        save_tokens(arrays, directory, tokenizer_name=cfg.model.name_or_path)
    except OSError:  # another process published it first: use theirs
        if not os.path.isdir(directory):
            raise
    log.info("tokenised %d %s texts into %s", len(arrays), split, directory)
    return load_tokens(directory)


def open_images(cfg: Config, dataset: Dataset) -> FeatureBank | None:
    """The dataset's image feature bank when the model uses images (an error if it has none)."""
    if not (cfg.model.use_images and cfg.model.num_images > 0):
        return None
    if not dataset.features():
        raise IncompatibleArtifactError(f"'model.use_images' is true but {dataset.uri} has no image features "
                                        "(run jobs/embed_images.py first)")
    try:
        return FeatureBank.open(dataset.uri)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise IncompatibleArtifactError(f"'model.use_images' is true but {dataset.uri} has no image features "
                                        f"(run jobs/embed_images.py first): {err}") from err
