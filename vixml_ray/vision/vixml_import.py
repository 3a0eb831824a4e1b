"""Import of the image data ViXML released (github.com/DiegoOrtego/vixml), so users can start from the paper's data.

The release folder of a dataset holds, per split (train/test/labels, entities in the order of the XC files):

* ``{trn,tst,lbl}_embs_imgs_*.npy``: float ``[n_images, D]``, one pooled SigLIP2 vector per downloaded image
  (``google/siglip2-so400m-patch14-384``, D = 1152);
* ``{train,test,labels}_imgs_*_map.npy``: an object array with one entry per entity: the list of its image rows in
  the embedding array (list position = image slot), or ``-1`` when it has no image. Loading it needs
  ``allow_pickle=True``: import only files from a source you trust;
* ``img_urls.parquet`` (``id``, ``url``): the image URLs of each product id, one row per image, in slot order.

:func:`import_vixml_features` turns the arrays into this project's feature cache (the same shards, bank and
manifest entry as :func:`vixml_ray.vision.pipeline.embed_images` writes); :func:`image_manifest_from_urls` turns
``img_urls.parquet`` into the dataset's image manifest (``IMAGES_SCHEMA``) so the pipeline can embed the images.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vixml_ray import storage
from vixml_ray.config import Config
from vixml_ray.data import schema
from vixml_ray.data.dataset import open_dataset
from vixml_ray.errors import IncompatibleArtifactError, InputError, MissingPathError, OutputExistsError
from vixml_ray.vision import cache

RELEASE_MODEL = "google/siglip2-so400m-patch14-384"
DEFAULT_SLUG = "vixml-release.siglip2-so400m-patch14-384"
EMB_PATTERNS = {"train": "trn_embs_imgs_*.npy", "test": "tst_embs_imgs_*.npy", "label": "lbl_embs_imgs_*.npy"}
MAP_PATTERNS = {"train": "train_imgs_*_map.npy", "test": "test_imgs_*_map.npy", "label": "labels_imgs_*_map.npy"}
URLS_FILE = "img_urls.parquet"


def _list(source: str) -> list[str]:
    fs, path = storage.filesystem(source)
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)) if info.is_file)


def _one(names: list[str], pattern: str, source: str) -> Optional[str]:
    matches = fnmatch.filter(names, pattern)
    if len(matches) > 1:
        raise InputError(source, None, f"several files match {pattern}: {matches}; keep one")
    return matches[0] if matches else None


def _entity_images(entry: Any, entity: int, where: str) -> list[int]:
    """An entity's image rows from a map entry: a list/array of ints, or -1 (or None) for none."""
    if entry is None or (np.isscalar(entry) and int(entry) == -1):
        return []
    if np.isscalar(entry):
        raise InputError(where, None, f"entity {entity}: expected a list of image rows or -1, got {entry!r}")
    return [int(i) for i in entry]


def _split_rows(split: str, image_map: np.ndarray, num_images: int, uids: list[str], where: str) -> dict[str, list]:
    """The feature rows (split, row, uid, slot, image index) of one split, in entity then slot order."""
    if len(image_map) != len(uids):
        raise IncompatibleArtifactError(f"{where}: {len(image_map)} entities, the dataset's {split} split has "
                                        f"{len(uids)}")
    out: dict[str, list] = {"row": [], "slot": [], "image": []}
    for entity, entry in enumerate(image_map):
        images = _entity_images(entry, entity, where)[: schema.MAX_IMAGES]
        for slot, image in enumerate(images):
            if not 0 <= image < num_images:
                raise InputError(where, None, f"entity {entity} slot {slot}: image row {image} outside "
                                              f"0..{num_images - 1}")
            out["row"].append(entity)
            out["slot"].append(slot)
            out["image"].append(image)
    out["uid"] = [uids[r] for r in out["row"]]
    out["split"] = [split] * len(out["row"])
    return out


def import_vixml_features(dataset_uri: str, source: str, cfg: Config) -> dict[str, Any]:
    """Writes the released arrays in ``source`` as the dataset's feature cache ``vision.slug`` (default
    ``vixml-release.siglip2-so400m-patch14-384``), in ``vision.cache_dtype``, shards of ``vision.rows_per_shard``
    image rows; returns a summary. Splits without released arrays get no images."""
    ds = open_dataset(dataset_uri)
    v = cfg.vision
    slug = v.slug or DEFAULT_SLUG
    names = _list(source)
    files = {s: (_one(names, EMB_PATTERNS[s], source), _one(names, MAP_PATTERNS[s], source)) for s in schema.SPLITS}
    found = {s: f for s, f in files.items() if all(f)}
    for split, (emb_name, map_name) in files.items():
        if bool(emb_name) != bool(map_name):
            raise MissingPathError(source, f"{source}: {split} has {emb_name or map_name} but not its "
                                           f"{'map' if emb_name else 'embedding'} file")
    if not found:
        raise MissingPathError(source, f"{source}: no released image arrays ({', '.join(EMB_PATTERNS.values())})")

    num_rows = {s: ds.num_rows(s) for s in schema.SPLITS}
    cache_uri = storage.join(ds.uri, schema.FEATURES_DIR, slug)
    fingerprint = "vixml-release:" + ",".join(f"{s}={e}" for s, (e, _) in sorted(found.items()))
    specs: list[cache.ShardSpec] = []
    metas: dict[int, dict[str, Any]] = {}
    dim = None
    with tempfile.TemporaryDirectory(prefix="vixml-import-") as scratch:
        for split, (emb_name, map_name) in found.items():
            local = {name: storage.local_copy(storage.join(source, name), os.path.join(scratch, name))
                     for name in (emb_name, map_name)}  # numpy loads local files
            emb = np.load(local[emb_name], mmap_mode="r")
            if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
                raise InputError(f"{source}/{emb_name}", None, f"shape {emb.shape}, expected [n_images, {dim or 'D'}]")
            dim = int(emb.shape[1])
            image_map = np.load(local[map_name], allow_pickle=True)
            rows = _split_rows(split, image_map, len(emb), ds.uids(split), f"{source}/{map_name}")
            for lo in range(0, len(rows["row"]), v.rows_per_shard):
                part = {k: np.asarray(x[lo: lo + v.rows_per_shard]) for k, x in rows.items()}
                start = specs[-1].stop if specs else 0
                spec, meta = _write_shard(cache_uri, len(specs), start, part, emb, emb_name, v.cache_dtype,
                                          fingerprint)
                specs.append(spec)
                metas[spec.index] = meta
    model = {"backend": "hf_siglip", "model_name": RELEASE_MODEL, "weights": RELEASE_MODEL, "image_size": None,
             "dim": dim, "dtype": v.cache_dtype, "fingerprint": fingerprint, "source": source}
    counts, _ = cache.finish(dataset_uri, slug, specs, metas, num_rows, dim, v.cache_dtype, model, fingerprint,
                             {"imported_from": source})
    return {"dataset": ds.uri, "features": cache_uri, "slug": slug, "dim": dim, "images": counts["images"],
            "valid": counts["valid"], "valid_per_split": counts["valid_per_split"], "shards": len(specs),
            "splits_imported": sorted(found)}


def _write_shard(cache_uri: str, index: int, start: int, part: dict[str, np.ndarray], emb: np.ndarray,
                 emb_name: str, dtype: str, fingerprint: str) -> tuple[cache.ShardSpec, dict[str, Any]]:
    """One output shard of imported rows (all valid: every listed image has an embedding)."""
    n = len(part["row"])
    keys = pa.table({"split": part["split"], "row": part["row"], "slot": part["slot"],
                     "uri": [f"{emb_name}#{i}" for i in part["image"]]})
    spec = cache.ShardSpec(index, start, start + n, cache.input_digest(keys))
    columns = {**{k: part[k] for k in ("split", "row", "uid", "slot")}, "valid": np.ones(n, dtype=bool),
               "reason": np.full(n, "", dtype=object), "converted": np.full(n, "", dtype=object),
               "embedding": np.asarray(emb[part["image"]])}
    meta = cache.shard_meta(spec, fingerprint, columns)
    cache.write_shard(cache.shard_uri(cache_uri, spec), cache.shard_table(columns, emb.shape[1], dtype, meta))
    return spec, meta


# ------------------------------------------------------------------------------------------------- image URLs
def image_manifest_from_urls(dataset_uri: str, urls_uri: str) -> pa.Table:
    """The image manifest (``IMAGES_SCHEMA``) of ``img_urls.parquet``: each item/label whose uid is an ``id``
    gets its URLs as slots 0..2 in file order; empty URLs are dropped."""
    ds = open_dataset(dataset_uri)
    fs, path = storage.filesystem(urls_uri)
    urls = pq.read_table(path, columns=["id", "url"], filesystem=fs)
    by_id: dict[str, list[str]] = {}
    for pid, url in zip(urls.column("id").to_pylist(), urls.column("url").to_pylist()):
        if pid is not None and url:
            slots = by_id.setdefault(str(pid), [])
            if len(slots) < schema.MAX_IMAGES:
                slots.append(url)
    out: dict[str, list] = {name: [] for name in schema.IMAGES_SCHEMA.names}
    for split in schema.SPLITS:
        for row, uid in enumerate(ds.uids(split)):
            for slot, url in enumerate(by_id.get(uid, ())):
                out["split"].append(split)
                out["row"].append(row)
                out["uid"].append(uid)
                out["slot"].append(slot)
                out["uri"].append(url)
    return pa.table(out, schema=schema.IMAGES_SCHEMA)


def write_image_manifest(dataset_uri: str, table: pa.Table) -> str:
    """Writes ``table`` as the dataset's ``images.parquet`` (temporary file + rename on local disk); refuses to
    replace a manifest that already lists images."""
    root = storage.resolve(dataset_uri)
    uri = storage.join(root, schema.IMAGES_FILE)
    fs, path = storage.filesystem(uri)
    if storage.exists(uri):
        with fs.open_input_file(path) as f:
            existing = pq.ParquetFile(f).metadata.num_rows
        if existing:
            raise OutputExistsError(uri, f"{uri} already lists {existing} images; remove it to import {URLS_FILE}")
    cache.write_shard(uri, table.cast(schema.IMAGES_SCHEMA))
    return uri


def import_vixml(dataset_uri: str, source: str, cfg: Config) -> dict[str, Any]:
    """Imports what ``source`` holds: the released arrays as a feature cache and/or ``img_urls.parquet`` as the
    image manifest (to embed the images with :func:`vixml_ray.vision.pipeline.embed_images` afterwards)."""
    names = _list(source)
    has_arrays = any(fnmatch.filter(names, p) for p in EMB_PATTERNS.values())
    if not has_arrays and URLS_FILE not in names:
        raise MissingPathError(source, f"{source}: neither released image arrays ({', '.join(EMB_PATTERNS.values())}) "
                                       f"nor {URLS_FILE}")
    summary: dict[str, Any] = {}
    if URLS_FILE in names:
        table = image_manifest_from_urls(dataset_uri, storage.join(source, URLS_FILE))
        summary["image_manifest"] = {"uri": write_image_manifest(dataset_uri, table), "images": table.num_rows}
    if has_arrays:
        summary["features"] = import_vixml_features(dataset_uri, source, cfg)
    return summary
