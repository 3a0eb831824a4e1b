"""Synthetic multimodal XMC data whose label identity is split between text and images.

Identity (T = ``num_topics``, A = ``num_attributes``, L = ``labels_per_item``, all from ``data.synthetic``):

* Labels are all (topic t, attribute a) pairs; label row = ``t * A + a``; uid ``lbl<row>``.
* Vocabulary: pseudo-words of consonant-vowel syllables (``"kotemu"``), a fixed function of the word index (not of
  the seed). Topic t owns words ``3t, 3t+1, 3t+2``; a shared pool of 512 noise words follows the topic words.
  Attribute a is named ``"<colour> <shape>"`` (``"red circle"``, see :mod:`.synthetic_images`); no vocabulary word
  can be a colour or shape name (those are not consonant-vowel words).
* Item (uid ``trn<i>`` / ``tst<i>``): one attribute a, uniform; L distinct topics, uniform (or, with
  ``topic_zipf`` = s > 0, long-tailed: each draw picks topic t with probability ~ 1/(t+1)^s, a repeat within an
  item is redrawn uniformly); labels
  ``{(t_1, a), ..., (t_L, a)}`` with relevance 1. Text = 2 of the 3 words of each of its topics plus
  ``noise_words`` noise words, shuffled: it names the TOPICS and NEVER the attribute.
* Label text = its topic's 3 words followed by its attribute name (allowed: item texts never contain attribute
  words, so the label side naming it leaks nothing; it keeps the A labels of a topic distinct for text-only models).
* Images (dataset format only): every item and label gets ``U{1..max_images}`` image slots; each slot's file is
  left out with probability ``missing_image_prob`` (its manifest row stays, so the embedding job must count and mask
  it). Every image shows its entity's attribute: the attribute's background colour and shape, jittered per image.
  Slot 0 is PNG, slots 1-2 JPEG. Files: ``images/<split>/<row:07d>_<slot>.<ext>``, manifest uris relative.

Consequence: the text identifies an item's topics but carries no information about its attribute, so for any
text-only model each of a topic's A labels is equally likely and P@1 is at most ~1/A in expectation; the images
carry the attribute, so text+image can approach P@1 = 1 (minus items whose every image file is missing).

Determinism: identity is drawn per chunk of 65,536 rows from ``SeedSequence([seed, split, 0, chunk, 0])``, an
entity's image slots from ``[seed, split, 1, row, 0]`` and each image from ``[seed, split, 2, row, slot]``, so the
same seed gives byte-identical parquet files, images and raw files, independent of batch sizes.

Formats: ``dataset`` writes a prepared dataset directory (parquet + images + manifest, like prepare_data);
``xc`` writes the raw repository files ``trn/tst/lbl.json.gz`` (no images), vectorised and streamed through gzip,
fast enough for millions of items (the prepare_data scale benchmark uses it).
"""

from __future__ import annotations

import gzip
import math
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vixml_ray import storage
from vixml_ray.config import Config, SyntheticConfig
from vixml_ray.data import schema
from vixml_ray.data.filters import normalise_pairs
from vixml_ray.data.synthetic_images import attribute_name, encode, render
from vixml_ray.data.writer import DatasetWriter
from vixml_ray.errors import ConfigError

TOPIC_WORDS = 3  # words owned by each topic
ITEM_TOPIC_WORDS = 2  # of them, named per topic in an item text
NOISE_POOL = 512
CHUNK_ROWS = 65536  # generation chunk: fixed so the data do not depend on batch sizes
SPLIT_IDS = {"train": 0, "test": 1, "label": 2}
UID_PREFIX = {"train": "trn", "test": "tst", "label": "lbl"}
_IDENTITY, _SLOTS, _PIXELS = 0, 1, 2  # random stream kinds

_SYLLABLES = pa.array([c + v for c in "bdfgklmnprstvz" for v in "aeiou"])
_WORD_MULTIPLIER = 1_000_003  # coprime with 70: index -> word is a bijection that scatters neighbouring indices


def vocabulary(size: int) -> pa.Array:
    """``size`` distinct pseudo-words (at least 3 syllables), a pure function of the index."""
    base = len(_SYLLABLES)
    syllables = max(3, math.ceil(math.log(max(size, 2), base)))
    code = (np.arange(size, dtype=np.int64) * _WORD_MULTIPLIER + 7) % (base ** syllables)
    parts = [_SYLLABLES.take(pa.array((code // base ** k) % base)) for k in range(syllables)]
    return pc.binary_join_element_wise(*parts, "")


def _join(vocab: pa.Array, words: np.ndarray) -> pa.Array:
    """Rows of word indices [n, w] -> strings joined by spaces."""
    n, w = words.shape
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, n * w + 1, w, dtype=np.int32)),
                                     vocab.take(pa.array(words.reshape(-1))))
    return pc.binary_join(lists, " ")


def _uids(split: str, start: int, n: int) -> pa.Array:
    numbers = pa.array(np.arange(start, start + n, dtype=np.int64)).cast(pa.string())
    return pc.binary_join_element_wise(UID_PREFIX[split], numbers, "")


def _chunks(n: int) -> Iterator[tuple[int, int, int]]:
    for chunk, start in enumerate(range(0, n, CHUNK_ROWS)):
        yield chunk, start, min(CHUNK_ROWS, n - start)


def _rng(seed: int, split: str, kind: int, index: int, slot: int = 0) -> np.random.Generator:
    """The random stream of one (split, kind, index, slot); keys have a fixed length because SeedSequence treats
    trailing zeros as absent (``[1, 2]`` and ``[1, 2, 0]`` give the same stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], kind, index, slot]))


def _distinct_topics(rng: np.random.Generator, n: int, num_topics: int, per_item: int,
                     cdf: np.ndarray | None = None) -> np.ndarray:
    """[n, per_item] distinct topics per row, sorted. Uniform (``cdf`` None): independent draws, and a fresh draw
    without replacement for the (rare, when per_item**2 << num_topics) rows that repeat a topic. Long-tailed
    (``cdf``: cumulative topic probabilities): inverse-CDF draws, each repeat redrawn uniformly until none is left."""
    if cdf is None:
        topics = np.sort(rng.integers(0, num_topics, size=(n, per_item)), axis=1)
        for row in np.flatnonzero((topics[:, 1:] == topics[:, :-1]).any(axis=1)):
            topics[row] = np.sort(rng.choice(num_topics, size=per_item, replace=False))
        return topics
    topics = np.sort(np.minimum(np.searchsorted(cdf, rng.random((n, per_item)), side="right"), num_topics - 1),
                     axis=1)
    while True:
        repeat = np.zeros(topics.shape, dtype=bool)
        repeat[:, 1:] = topics[:, 1:] == topics[:, :-1]
        if not repeat.any():
            return topics
        topics[repeat] = rng.integers(0, num_topics, size=int(repeat.sum()))
        topics.sort(axis=1)


class Identity:
    """The vectorised generator of item and label rows (see the module docstring)."""

    def __init__(self, syn: SyntheticConfig):
        if syn.labels_per_item > syn.num_topics:
            raise ConfigError(f"invalid value for 'data.synthetic.labels_per_item': {syn.labels_per_item} exceeds "
                              f"'data.synthetic.num_topics' ({syn.num_topics})")
        self.syn = syn
        self.num_labels = syn.num_topics * syn.num_attributes
        self.vocab = vocabulary(TOPIC_WORDS * syn.num_topics + NOISE_POOL)
        self.attribute_names = pa.array([attribute_name(a) for a in range(syn.num_attributes)])
        self.topic_cdf = None
        if syn.topic_zipf > 0:
            weights = np.arange(1, syn.num_topics + 1, dtype=np.float64) ** -syn.topic_zipf
            self.topic_cdf = np.cumsum(weights) / weights.sum()

    def items(self, split: str, chunk: int, start: int, n: int) -> tuple[pa.RecordBatch, np.ndarray]:
        """One chunk of items as an ``ITEMS_SCHEMA`` batch, and each row's attribute."""
        syn = self.syn
        rng = _rng(syn.seed, split, _IDENTITY, chunk)
        attribute = rng.integers(0, syn.num_attributes, size=n)
        topics = _distinct_topics(rng, n, syn.num_topics, syn.labels_per_item, self.topic_cdf)
        drop = rng.integers(0, TOPIC_WORDS, size=topics.shape)  # each topic names all its words but one
        named = [TOPIC_WORDS * topics + (drop + k) % TOPIC_WORDS for k in range(1, ITEM_TOPIC_WORDS + 1)]
        noise = TOPIC_WORDS * syn.num_topics + rng.integers(0, NOISE_POOL, size=(n, syn.noise_words))
        words = np.concatenate([*named, noise], axis=1)
        order = np.argsort(rng.random(words.shape), axis=1)
        text = _join(self.vocab, np.take_along_axis(words, order, axis=1))
        labels = topics * syn.num_attributes + attribute[:, None]
        offsets = pa.array(np.arange(0, labels.size + 1, labels.shape[1], dtype=np.int32))
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(np.arange(start, start + n, dtype=np.int64)),
                _uids(split, start, n),
                text,
                pa.ListArray.from_arrays(offsets, pa.array(labels.reshape(-1).astype(np.int32))),
                pa.ListArray.from_arrays(offsets, pa.array(np.ones(labels.size, dtype=np.float32))),
            ],
            schema=schema.ITEMS_SCHEMA,
        )
        return batch, attribute

    def labels(self, start: int, n: int) -> tuple[pa.RecordBatch, np.ndarray]:
        """Labels ``start..start+n-1`` as a ``LABELS_SCHEMA`` batch, and each label's attribute."""
        rows = np.arange(start, start + n, dtype=np.int64)
        topic, attribute = rows // self.syn.num_attributes, rows % self.syn.num_attributes
        words = TOPIC_WORDS * topic[:, None] + np.arange(TOPIC_WORDS)
        text = pc.binary_join_element_wise(_join(self.vocab, words), self.attribute_names.take(pa.array(attribute)),
                                           " ")
        batch = pa.RecordBatch.from_arrays([pa.array(rows), _uids("label", start, n), text],
                                           schema=schema.LABELS_SCHEMA)
        return batch, attribute


# ------------------------------------------------------------------------------------------------ dataset format
def _write_images(fs: Any, root: str, split: str, batch: pa.RecordBatch, attribute: np.ndarray,
                  syn: SyntheticConfig) -> tuple[pa.RecordBatch, int]:
    """Renders one batch's images into ``root/images/<split>/``; returns their manifest rows and how many slots
    were left without a file."""
    rows = batch.column("row").to_numpy()
    uids = batch.column("uid").to_pylist()
    out: dict[str, list] = {"split": [], "row": [], "uid": [], "slot": [], "uri": []}
    left_out = 0
    if syn.max_images == 0:
        return pa.RecordBatch.from_pydict(out, schema=schema.IMAGES_SCHEMA), 0
    fs.create_dir(f"{root}/{schema.IMAGES_DIR}/{split}", recursive=True)
    for i, row in enumerate(rows):
        rng = _rng(syn.seed, split, _SLOTS, int(row))
        slots = int(rng.integers(1, syn.max_images + 1))
        missing = rng.random(slots) < syn.missing_image_prob
        for slot in range(slots):
            ext = "png" if slot == 0 else "jpg"
            rel = f"{schema.IMAGES_DIR}/{split}/{int(row):07d}_{slot}.{ext}"
            out["split"].append(split)
            out["row"].append(int(row))
            out["uid"].append(uids[i])
            out["slot"].append(slot)
            out["uri"].append(rel)
            if missing[slot]:
                left_out += 1
                continue
            pixels = render(int(attribute[i]), syn.image_size, _rng(syn.seed, split, _PIXELS, int(row), slot))
            with fs.open_output_stream(f"{root}/{rel}", compression=None) as f:
                f.write(encode(pixels, ext))
    return pa.RecordBatch.from_pydict(out, schema=schema.IMAGES_SCHEMA), left_out


def _write_dataset(staging: str, cfg: Config, identity: Identity) -> dict[str, Any]:
    syn = cfg.data.synthetic
    fs, root = storage.filesystem(staging)
    writer = DatasetWriter(staging)
    missing = 0
    try:
        for _, start, n in _chunks(identity.num_labels):
            batch, attribute = identity.labels(start, n)
            writer.splits["label"].write(batch)
            images, left_out = _write_images(fs, root, "label", batch, attribute, syn)
            writer.images.write(images)
            missing += left_out
        for split, total in (("train", syn.num_train), ("test", syn.num_test)):
            for chunk, start, n in _chunks(total):
                batch, attribute = identity.items(split, chunk, start, n)
                writer.splits[split].write(batch)
                images, left_out = _write_images(fs, root, split, batch, attribute, syn)
                writer.images.write(images)
                missing += left_out
        return writer.finish(cfg, normalise_pairs([]), {
            "kind": "synthetic",
            "source": f"synthetic(seed={syn.seed})",
            "label_source": "synthetic",
            "filters": "none",
            "attributes": identity.attribute_names.to_pylist(),
            "text_only_p1_bound": 1.0 / syn.num_attributes,
        }, extra_counts={"images_missing": missing})
    except BaseException:
        writer.close()
        raise


# ----------------------------------------------------------------------------------------------------- xc format
def _json_lines(parts: list[pa.Array | str]) -> memoryview:
    """Concatenates string columns and literals per row, adds newlines, returns all rows' bytes (zero-copy)."""
    lines = pc.binary_join_element_wise(*parts, "\n", "")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1, offset=4 * lines.offset)
    return memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]]


def _write_gzip(fs: Any, path: str, blocks: Iterator[memoryview]) -> None:
    """Streams ``blocks`` through gzip (level 1, no name or time in the header: same bytes in, same file out)."""
    with fs.open_output_stream(path, compression=None) as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as gz:
        for block in blocks:
            gz.write(block)


def _xc_item_blocks(identity: Identity, split: str, total: int) -> Iterator[memoryview]:
    rel = ", ".join(["1.0"] * identity.syn.labels_per_item)
    for chunk, start, n in _chunks(total):
        batch, _ = identity.items(split, chunk, start, n)
        targets = pc.binary_join(batch.column("labels").cast(pa.list_(pa.string())), ", ")
        yield _json_lines(['{"uid": "', batch.column("uid"), '", "title": "', batch.column("text"),
                           '", "content": "", "target_ind": [', targets, f'], "target_rel": [{rel}]}}'])


def _xc_label_blocks(identity: Identity) -> Iterator[memoryview]:
    for _, start, n in _chunks(identity.num_labels):
        batch, _ = identity.labels(start, n)
        yield _json_lines(['{"uid": "', batch.column("uid"), '", "title": "', batch.column("text"), '"}'])


def _write_xc(staging: str, identity: Identity) -> dict[str, int]:
    fs, root = storage.filesystem(staging)
    syn = identity.syn
    _write_gzip(fs, f"{root}/lbl.json.gz", _xc_label_blocks(identity))
    _write_gzip(fs, f"{root}/tst.json.gz", _xc_item_blocks(identity, "test", syn.num_test))
    _write_gzip(fs, f"{root}/trn.json.gz", _xc_item_blocks(identity, "train", syn.num_train))
    return {"train": syn.num_train, "test": syn.num_test, "labels": identity.num_labels}


def generate_synthetic(out: str, cfg: Config, fmt: str = "dataset", overwrite: bool = False) -> dict[str, Any]:
    """Writes synthetic data of ``cfg.data.synthetic`` to ``out`` (published atomically) as a prepared dataset
    (``fmt="dataset"``, with images) or as raw XC files (``fmt="xc"``, image-less); returns a summary."""
    if fmt not in ("dataset", "xc"):
        raise ValueError(f"unknown synthetic format {fmt!r} (formats: dataset, xc)")
    start = time.perf_counter()
    identity = Identity(cfg.data.synthetic)
    with storage.publish(out, overwrite=overwrite) as staging:
        if fmt == "dataset":
            manifest = _write_dataset(staging, cfg, identity)
            counts, content_hash = manifest["counts"], manifest["content_hash"]
        else:
            counts, content_hash = _write_xc(staging, identity), None
    summary = {"out": out, "format": fmt, "counts": counts, "seconds": round(time.perf_counter() - start, 2)}
    if content_hash:
        summary["content_hash"] = content_hash
    return summary
