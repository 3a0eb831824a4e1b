"""prepare_data: a raw Extreme Classification Repository folder -> a published dataset directory.

One streaming pass per file, in the order labels -> test -> train (labels first: their count bounds every target
index; test before train: reciprocal filters need the test uids). Memory is bounded by one batch of
``DataConfig.write_batch_rows`` items plus per-LABEL state (the label uids, only for ``self_reciprocal`` filters) and
the filter pairs themselves; it does not grow with the number of items. Raw XC data has no images, so the image
manifest is written empty.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from vixml_ray import storage
from vixml_ray.config import Config
from vixml_ray.data.filters import SelfReciprocalFilter, normalise_pairs, resolve_mode
from vixml_ray.data.writer import DatasetWriter
from vixml_ray.data.xc_format import (
    XY_FILES,
    SourceFiles,
    iter_item_batches,
    iter_label_batches,
    locate_source,
    read_filter_file,
)
from vixml_ray.errors import InputError, MissingPathError

log = logging.getLogger(__name__)


def label_source(cfg_value: str, files: SourceFiles, source: str) -> str:
    """``json`` or ``xy`` (see :mod:`vixml_ray.data.xc_format`)."""
    has_xy = files.train_xy is not None and files.test_xy is not None
    if cfg_value == "xy" and not has_xy:
        missing = XY_FILES["train"] if files.train_xy is None else XY_FILES["test"]
        raise MissingPathError(storage.join(source, missing),
                               f"data.label_source=xy but {source} lacks trn_X_Y.txt and/or tst_X_Y.txt")
    if cfg_value == "auto":
        return "xy" if has_xy else "json"
    return cfg_value


def prepare_dataset(source: str, out: str, cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Converts the raw XC folder ``source`` into the dataset directory ``out`` (published atomically).

    Returns a summary: output path, counts, label source, filter mode, content hash and seconds taken.
    """
    start = time.perf_counter()
    data = cfg.data
    files = locate_source(source)
    mode = resolve_mode(data.filters, files.filters, source)
    labels_from = label_source(data.label_source, files, source)
    batch_rows = data.write_batch_rows
    with storage.publish(out, overwrite=overwrite) as staging:
        writer = DatasetWriter(staging)
        try:
            label_uids = []
            for batch in iter_label_batches(files.labels, data.text_fields, data.text_separator, batch_rows,
                                            data.label_text):
                writer.splits["label"].write(batch)
                if mode == "self_reciprocal":
                    label_uids.append(batch.column("uid"))
            num_labels = writer.splits["label"].rows
            if num_labels == 0:
                raise InputError(files.labels, None, "no labels")
            recip = SelfReciprocalFilter(pa.concat_arrays(label_uids)) if mode == "self_reciprocal" else None
            for split in ("test", "train"):
                xy = (files.test_xy if split == "test" else files.train_xy) if labels_from == "xy" else None
                uri = files.test if split == "test" else files.train
                for batch in iter_item_batches(uri, num_labels, data.text_fields, data.text_separator, batch_rows,
                                               xy_uri=xy):
                    writer.splits[split].write(batch)
                    if recip is not None:
                        (recip.add_test if split == "test" else recip.add_train)(batch)
                log.info("prepare: %s %d items", split, writer.splits[split].rows)
            if mode == "file":
                pairs = normalise_pairs(read_filter_file(files.filters, writer.splits["test"].rows, num_labels))
            else:
                pairs = recip.pairs() if recip is not None else normalise_pairs([])
            manifest = writer.finish(cfg, pairs, {
                "kind": "xc",
                "source": source,
                "label_source": labels_from,
                "filters": mode,
                "text_fields": list(data.text_fields),
                "text_separator": data.text_separator,
                "label_text": data.label_text,
            })
        except BaseException:
            writer.close()
            raise
    return {
        "out": out,
        "counts": manifest["counts"],
        "label_source": labels_from,
        "filters": mode,
        "label_text": data.label_text,
        "content_hash": manifest["content_hash"],
        "seconds": round(time.perf_counter() - start, 2),
    }
