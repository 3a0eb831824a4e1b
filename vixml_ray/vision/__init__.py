"""Frozen image towers, the Ray Data image-embedding pipeline and the feature cache training reads.

* :func:`embed_images` -- a dataset's image manifest -> ``<dataset>/features/<slug>/`` (resumable Ray Data job);
* :class:`FeatureBank` -- ``FeatureBank.open(dataset_uri).get(split, rows)`` -> ``[B, 3, D]`` features + ``[B, 3]``
  mask, memory-mapped;
* :func:`import_vixml` -- ViXML's released image arrays / ``img_urls.parquet`` -> the same cache / image manifest;
* :func:`feature_slug` -- the cache folder name a :class:`~vixml_ray.config.VisionConfig` writes to.

Modules: ``fetch`` (bytes from paths, URIs, HTTP), ``decode`` (bytes -> RGB or a reason), ``openclip_backend`` and
``hf_backend`` (towers and their preprocessing), ``towers`` (the common interface), ``stages`` (the Ray Data
stages), ``cache`` (shards, bank, manifest), ``pipeline``, ``bank``, ``vixml_import``, ``tiny`` (test towers).
"""

from vixml_ray.vision.bank import FeatureBank
from vixml_ray.vision.pipeline import embed_images
from vixml_ray.vision.towers import feature_slug
from vixml_ray.vision.vixml_import import import_vixml

__all__ = ["FeatureBank", "embed_images", "feature_slug", "import_vixml"]
