"""A trained inference export as the inference jobs (label refresh, evaluation, prediction) use it.

* :func:`read_export`: the export's config, metadata and a content fingerprint (an index version records it, so a
  query is never scored against labels embedded by another model);
* :func:`job_config`: the config a job runs with: the export's own config (or ``--config``) with dotted overrides; the
  settings that define the model (``model``, ``prompt``, the vision tower) must stay the export's;
* :func:`feature_cache`: the dataset's image feature cache made by the export's vision tower.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from omegaconf import OmegaConf

from vixml_ray import storage
from vixml_ray.config import Config, load_config, read_config
from vixml_ray.data.dataset import Dataset
from vixml_ray.errors import ConfigError, IncompatibleArtifactError, MissingPathError
from vixml_ray.model.embedder import CONFIG_FILE, EXPORT_FILE, WEIGHTS_FILE
from vixml_ray.model.lexical import VOCABULARY_FILE, LexicalHead, load_lexical
from vixml_ray.model.lexical import WEIGHTS_FILE as LEXICAL_WEIGHTS_FILE

# vision settings that change the image features a model was trained on (runtime knobs may differ)
VISION_IDENTITY = ("backend", "model_name", "weights", "model_config", "image_size", "cache_dtype")
# what a feature cache's recorded model must share with the export's vision config
FEATURE_MODEL_KEYS = ("backend", "model_name", "weights", "image_size")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Export:
    """An inference export directory (see :meth:`vixml_ray.model.embedder.Embedder.save_export`)."""

    uri: str  # the resolved directory holding the files
    cfg: Config  # the resolved config it was trained with
    meta: dict[str, Any]  # export.json: image_dim, kind, hidden_size, ...
    fingerprint: str  # SHA-256 over its files

    @property
    def image_dim(self) -> int | None:
        return self.meta.get("image_dim")

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def uses_images(self) -> bool:
        return self.image_dim is not None

    def check_labels(self, dataset: Dataset) -> None:
        """A model with per-label vectors (prototypes, classifiers) scores exactly the labels it was trained with, by
        row: the dataset's label catalogue (uids in row order) must be that one."""
        catalogue = self.meta.get("label_catalogue")
        if catalogue is None:
            return
        if dataset.num_labels != self.meta.get("num_labels") or dataset.label_catalogue() != catalogue:
            parts = " and ".join(name for name, has in (("label prototypes", self.cfg.model.prototypes.enabled),
                                                         ("classifier vectors", self.meta.get("classifiers")),
                                                         ("a lexical head", self.meta.get("lexical"))) if has)
            raise IncompatibleArtifactError(f"the export {self.uri} has {parts or 'per-label vectors'} for "
                                            f"{self.meta.get('num_labels')} labels of another label set than "
                                            f"{dataset.file_uri('label')} ({dataset.num_labels} labels); use the "
                                            "dataset it was trained on, or retrain")

    def lexical_head(self) -> LexicalHead | None:
        """The export's sparse lexical head (``model.lexical``), or None."""
        return load_lexical(self.uri, self.cfg.model.lexical) if self.meta.get("lexical") else None

    def identity(self) -> dict[str, Any]:
        """What an index version records about the model that embedded its labels."""
        return {"uri": self.uri, "fingerprint": self.fingerprint, "model": self.cfg.model.name_or_path,
                "kind": self.meta.get("kind"), "hidden_size": self.hidden_size, "image_dim": self.image_dim}


def absolute_uri(uri: str) -> str:
    """A URI as is, a local path made absolute (Ray workers do not share the driver's working directory)."""
    return uri if "://" in uri else storage.filesystem(uri)[1]


def export_fingerprint(root: str) -> str:
    """SHA-256 over the export's config, metadata and weights (and its lexical head's files), streamed."""
    digest = hashlib.sha256()
    lexical = (LEXICAL_WEIGHTS_FILE, VOCABULARY_FILE) if storage.exists(storage.join(root, VOCABULARY_FILE)) else ()
    for name in (CONFIG_FILE, EXPORT_FILE, WEIGHTS_FILE, *lexical):
        fs, path = storage.filesystem(storage.join(root, name))
        digest.update(name.encode("utf-8") + b"\0")
        with fs.open_input_stream(path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def read_export(uri: str) -> Export:
    """The export at ``uri`` (a published directory: its ``CURRENT`` pointer is followed)."""
    root = storage.resolve(absolute_uri(str(uri)))
    missing = [n for n in (CONFIG_FILE, EXPORT_FILE, WEIGHTS_FILE) if not storage.exists(storage.join(root, n))]
    if missing:
        raise MissingPathError(uri, f"{uri}: not an inference export (missing {', '.join(missing)})")
    meta = storage.read_json(storage.join(root, EXPORT_FILE))
    return Export(root, read_config(storage.join(root, CONFIG_FILE)), meta, export_fingerprint(root))


def _differences(prefix: str, ours: Any, theirs: Any, keys: Sequence[str] | None = None) -> list[str]:
    a = OmegaConf.to_container(OmegaConf.structured(ours))
    b = OmegaConf.to_container(OmegaConf.structured(theirs))
    return [f"'{prefix}.{k}': {a[k]!r} (the export has {b[k]!r})" for k in (keys or a) if a[k] != b[k]]


def job_config(export_uri: str, config_path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The export's config (or the preset ``config_path``) with dotted ``overrides``.

    Jobs may change runtime settings (``index``, ``eval``, ``infer``, ``ray``, vision batch sizes, ...), never what
    defines the model: ``model``, ``prompt`` and the vision tower must equal the export's (a ConfigError names
    every key that differs).
    """
    export_file = storage.join(storage.resolve(absolute_uri(export_uri)), CONFIG_FILE)
    if not storage.exists(export_file):
        raise MissingPathError(export_uri, f"{export_uri}: not an inference export (no {CONFIG_FILE})")
    trained = read_config(export_file)
    cfg = load_config(config_path, overrides) if config_path else read_config(export_file, overrides)
    diffs = (_differences("model", cfg.model, trained.model) + _differences("prompt", cfg.prompt, trained.prompt)
             + _differences("vision", cfg.vision, trained.vision, VISION_IDENTITY))
    if diffs:
        raise ConfigError(f"the model, prompt and vision tower come from the export {export_uri}; the job config "
                          f"changes {'; '.join(diffs)}")
    return cfg


@dataclass(frozen=True)
class FeatureCache:
    """A dataset's image feature cache: its slug and the dataset manifest's entry (path, dim, dtype, model)."""

    slug: str
    info: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        return {"slug": self.slug, "dim": int(self.info["dim"]), "dtype": self.info["dtype"],
                "model": self.info.get("model", {})}


def check_feature_model(recorded: dict[str, Any], cfg: Config, where: str) -> None:
    """Raises unless the recorded feature model (a cache's ``model`` entry) is the vision tower of ``cfg``."""
    wrong = [f"{k}: {recorded.get(k)!r} vs {getattr(cfg.vision, k)!r}" for k in FEATURE_MODEL_KEYS
             if recorded.get(k) != getattr(cfg.vision, k)]
    if wrong:
        raise IncompatibleArtifactError(f"{where}: image features were made by another vision model than the "
                                        f"export's 'vision' config ({'; '.join(wrong)})")


def feature_cache(cfg: Config, export: Export, dataset: Dataset) -> FeatureCache | None:
    """The dataset's feature cache of the export's vision tower (None for a text-only model)."""
    if not export.uses_images:
        return None
    from vixml_ray.vision.towers import feature_slug  # torch/open_clip: only for image models

    slug = feature_slug(cfg.vision)
    caches = dataset.features()
    if slug not in caches:
        raise IncompatibleArtifactError(f"{dataset.uri}: no image feature cache '{slug}' for the export's vision "
                                        f"config (caches: {sorted(caches)}); run jobs/embed_images.py with the "
                                        "training config first")
    info = caches[slug]
    if int(info["dim"]) != export.image_dim:
        raise IncompatibleArtifactError(f"{dataset.uri}: feature cache '{slug}' has dim {info['dim']}, the "
                                        f"export's image projection expects {export.image_dim}")
    check_feature_model(info.get("model", {}), cfg, f"{dataset.uri} feature cache '{slug}'")
    return FeatureCache(slug, dict(info))
