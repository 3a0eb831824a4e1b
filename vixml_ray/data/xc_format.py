"""Streaming reader of the Extreme Classification Repository raw format.

A source folder holds ``trn.json.gz``, ``tst.json.gz`` and ``lbl.json.gz`` (``.json`` uncompressed also works), one
JSON object per line: items ``{uid, title, content, target_ind, target_rel}``, labels ``{uid, title}``. Optional:
``trn_X_Y.txt`` / ``tst_X_Y.txt`` (header ``rows cols``, then one line per item of space-separated ``label:value``
pairs) and ``filter_labels_test.txt`` (``test_row label`` pairs, one per line).

Label source (``DataConfig.label_source``): ``json`` takes ``target_ind``/``target_rel``; ``xy`` takes the
``*_X_Y.txt`` files, read in lockstep with the JSON lines (line i of the JSON file is row i of the matrix; row counts
and the label count must agree); ``auto`` uses the X_Y files when both are present — they are the matrices published
benchmark numbers are computed on — and ``target_ind`` otherwise.

An item's text joins the non-empty ``DataConfig.text_fields`` with ``text_separator`` (an empty ``content`` adds no
trailing separator). Bad input raises :class:`~vixml_ray.errors.InputError` naming the file, the line and the key or
uid.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import IO, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from vixml_ray import storage
from vixml_ray.data.schema import ITEMS_SCHEMA, LABELS_SCHEMA
from vixml_ray.errors import InputError, MissingPathError

ITEM_FILES = {"train": "trn", "test": "tst"}
LABEL_FILE = "lbl"
XY_FILES = {"train": "trn_X_Y.txt", "test": "tst_X_Y.txt"}
FILTER_FILE = "filter_labels_test.txt"
_READ_BUFFER = 1 << 20
_decode_json = json.JSONDecoder().raw_decode


@dataclass(frozen=True)
class SourceFiles:
    """The files of one raw XC source folder (URIs); optional ones are None when absent."""

    train: str
    test: str
    labels: str
    train_xy: Optional[str]
    test_xy: Optional[str]
    filters: Optional[str]


def locate_source(source: str) -> SourceFiles:
    """Finds the raw files of ``source``; a missing required file raises MissingPathError naming it."""

    def json_file(stem: str) -> str:
        for name in (f"{stem}.json.gz", f"{stem}.json"):
            uri = storage.join(source, name)
            if storage.exists(uri):
                return uri
        raise MissingPathError(storage.join(source, f"{stem}.json.gz"),
                               f"{source}: missing {stem}.json.gz (or {stem}.json)")

    def optional(name: str) -> Optional[str]:
        uri = storage.join(source, name)
        return uri if storage.exists(uri) else None

    if not storage.exists(source):
        raise MissingPathError(source, f"source folder not found: {source}")
    return SourceFiles(
        train=json_file(ITEM_FILES["train"]),
        test=json_file(ITEM_FILES["test"]),
        labels=json_file(LABEL_FILE),
        train_xy=optional(XY_FILES["train"]),
        test_xy=optional(XY_FILES["test"]),
        filters=optional(FILTER_FILE),
    )


def open_lines(uri: str) -> IO[bytes]:
    """A buffered binary line reader over a (possibly gzip-compressed) local file or URI."""
    fs, path = storage.filesystem(uri)
    return io.BufferedReader(fs.open_input_stream(path, compression="detect"), _READ_BUFFER)


def _parse(line: bytes, uri: str, lineno: int) -> dict:
    try:
        text = line.decode("utf-8").strip()
        obj, end = _decode_json(text)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(uri, lineno, f"malformed JSON line: {err}") from None
    if not isinstance(obj, dict):
        raise InputError(uri, lineno, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(obj: dict, key: str, uri: str, lineno: int, required: bool = True) -> str:
    """A string field ("" when absent and not required); an integer ``uid`` becomes a string."""
    value = obj.get(key)
    if type(value) is str:
        return value
    if value is None:
        if required:
            raise InputError(uri, lineno, f"missing key '{key}'")
        return ""
    if key == "uid" and type(value) is int:
        return str(value)
    raise InputError(uri, lineno, f"key '{key}' must be a string, got {type(value).__name__}")


def _text(obj: dict, fields: Sequence[str], separator: str, uri: str, lineno: int, content_required: bool) -> str:
    if len(fields) == 1:
        return _field(obj, fields[0], uri, lineno, required=(fields[0] == "title" or content_required))
    parts = [_field(obj, f, uri, lineno, required=(f == "title" or content_required)) for f in fields]
    return separator.join(p for p in parts if p)


def _targets(obj: dict, uri: str, lineno: int) -> tuple[list, list]:
    """``target_ind`` and ``target_rel`` (ones when absent) of one item; element types are checked per batch."""
    ind = obj.get("target_ind")
    if type(ind) is not list:
        raise InputError(uri, lineno, f"key 'target_ind' must be a list of integers (uid {obj.get('uid')!r})")
    rel = obj.get("target_rel")
    if rel is None:
        return ind, [1.0] * len(ind)
    if type(rel) is not list or len(rel) != len(ind):
        raise InputError(uri, lineno, f"key 'target_rel' must be a list of {len(ind)} numbers like 'target_ind' "
                                      f"(uid {obj.get('uid')!r})")
    return ind, rel


class XYReader:
    """Reads a sparse ``*_X_Y.txt`` label file one row at a time (header ``rows cols``, then ``j:v`` pairs)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._file = open_lines(uri)
        header = self._file.readline().split()
        try:
            self.rows, self.cols = int(header[0]), int(header[1])
        except (IndexError, ValueError):
            self._file.close()
            raise InputError(uri, 1, f"header must be 'rows cols', got {b' '.join(header).decode()!r}") from None
        self.lineno = 1

    def next_row(self) -> Optional[tuple[list[int], list[float]]]:
        """The next row's (labels, values), or None at the end of the file."""
        line = self._file.readline()
        if not line:
            return None
        self.lineno += 1
        ind, rel = [], []
        for token in line.split():
            j, sep, v = token.partition(b":")
            try:
                ind.append(int(j))
                rel.append(float(v) if sep else 1.0)
            except ValueError:
                raise InputError(self.uri, self.lineno, f"bad 'label:value' pair {token.decode()!r}") from None
        return ind, rel

    def close(self) -> None:
        self._file.close()


def _as_array(values: list) -> Optional[np.ndarray]:
    """``values`` as a numpy array, or None when they do not form a flat numeric array (e.g. nested lists)."""
    try:
        return np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        return None


def _row_of(flat_index: int, offsets: list[int]) -> int:
    return int(np.searchsorted(offsets, flat_index, side="right")) - 1


def _check_values(flat_ind: list, flat_rel: list, offsets: list[int], uids: list[str], linenos: list[int],
                  num_labels: int, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """The batch's label indices (int64) and relevances (float32), checked: integers in [0, num_labels), numbers."""
    ind = _as_array(flat_ind)
    if ind is None or (ind.size and ind.dtype.kind != "i"):
        row = _row_of(next(i for i, j in enumerate(flat_ind) if type(j) is not int or not -2**63 <= j < 2**63),
                      offsets)
        raise InputError(uri, linenos[row], f"key 'target_ind' must be a list of integers (uid {uids[row]!r})")
    bad = np.flatnonzero((ind < 0) | (ind >= num_labels))
    if bad.size:
        row = _row_of(int(bad[0]), offsets)
        raise InputError(uri, linenos[row], f"uid {uids[row]!r} has label index {int(ind[bad[0]])} outside "
                                            f"[0, {num_labels}) ({num_labels} labels)")
    rel = _as_array(flat_rel)
    if rel is None or (rel.size and rel.dtype.kind not in "if"):
        row = _row_of(next(i for i, v in enumerate(flat_rel) if type(v) not in (int, float)), offsets)
        raise InputError(uri, linenos[row], f"key 'target_rel' must be a list of numbers (uid {uids[row]!r})")
    return ind.astype(np.int64, copy=False), rel.astype(np.float32)


def iter_item_batches(
    uri: str,
    num_labels: int,
    text_fields: Sequence[str],
    separator: str,
    batch_rows: int,
    xy_uri: Optional[str] = None,
) -> Iterator[pa.RecordBatch]:
    """Streams an item file as :data:`ITEMS_SCHEMA` record batches of at most ``batch_rows`` rows.

    With ``xy_uri`` the labels come from that X_Y file (row i = i-th non-blank JSON line), else from ``target_ind``.
    Blank lines are skipped. Every label index is checked against ``num_labels``.
    """
    xy = XYReader(xy_uri) if xy_uri else None
    label_uri = xy_uri or uri
    if xy is not None and xy.cols != num_labels:
        xy.close()
        raise InputError(xy_uri, 1, f"header says {xy.cols} labels, the label file has {num_labels}")
    row = 0
    try:
        with open_lines(uri) as lines:
            uids: list[str] = []
            texts: list[str] = []
            flat_ind: list[int] = []
            flat_rel: list[float] = []
            offsets = [0]
            linenos: list[int] = []
            for lineno, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                obj = _parse(line, uri, lineno)
                uid = _field(obj, "uid", uri, lineno)
                texts.append(_text(obj, text_fields, separator, uri, lineno, content_required=True))
                if xy is None:
                    ind, rel = _targets(obj, uri, lineno)
                    linenos.append(lineno)
                else:
                    pair = xy.next_row()
                    if pair is None:
                        raise InputError(xy_uri, None, f"has {xy.rows} rows but {uri}:{lineno} (uid {uid!r}) "
                                                       f"is item {row + 1}")
                    ind, rel = pair
                    linenos.append(xy.lineno)
                uids.append(uid)
                flat_ind.extend(ind)
                flat_rel.extend(rel)
                offsets.append(len(flat_ind))
                row += 1
                if len(uids) == batch_rows:
                    yield _items_batch(row - len(uids), uids, texts, flat_ind, flat_rel, offsets, linenos,
                                       num_labels, label_uri)
                    uids, texts, flat_ind, flat_rel, offsets, linenos = [], [], [], [], [0], []
            if uids:
                yield _items_batch(row - len(uids), uids, texts, flat_ind, flat_rel, offsets, linenos, num_labels,
                                   label_uri)
        if xy is not None and (xy.rows != row or xy.next_row() is not None):
            raise InputError(xy_uri, None, f"has {xy.rows} rows (header) but {uri} has {row} items")
    finally:
        if xy is not None:
            xy.close()


def _items_batch(start: int, uids: list[str], texts: list[str], flat_ind: list[int], flat_rel: list[float],
                 offsets: list[int], linenos: list[int], num_labels: int, uri: str) -> pa.RecordBatch:
    flat, rel = _check_values(flat_ind, flat_rel, offsets, uids, linenos, num_labels, uri)
    offs = pa.array(offsets, pa.int32())
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.arange(start, start + len(uids), dtype=np.int64)),
            pa.array(uids, pa.string()),
            pa.array(texts, pa.string()),
            pa.ListArray.from_arrays(offs, pa.array(flat.astype(np.int32))),
            pa.ListArray.from_arrays(offs, pa.array(rel)),
        ],
        schema=ITEMS_SCHEMA,
    )


def iter_label_batches(uri: str, text_fields: Sequence[str], separator: str, batch_rows: int,
                       label_text: str = "text") -> Iterator[pa.RecordBatch]:
    """Streams a label file as :data:`LABELS_SCHEMA` record batches (label row = position; ``content`` optional).
    With ``label_text="uid"`` a label's text is its uid (a nameless catalogue; the text fields are not read)."""
    if label_text not in ("text", "uid"):
        raise ValueError(f"label_text must be 'text' or 'uid', got {label_text!r}")
    row = 0
    uids: list[str] = []
    texts: list[str] = []
    with open_lines(uri) as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            obj = _parse(line, uri, lineno)
            uids.append(_field(obj, "uid", uri, lineno))
            texts.append(uids[-1] if label_text == "uid"
                         else _text(obj, text_fields, separator, uri, lineno, content_required=False))
            row += 1
            if len(uids) == batch_rows:
                yield _labels_batch(row - len(uids), uids, texts)
                uids, texts = [], []
    if uids:
        yield _labels_batch(row - len(uids), uids, texts)


def _labels_batch(start: int, uids: list[str], texts: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(np.arange(start, start + len(uids), dtype=np.int64)), pa.array(uids, pa.string()),
         pa.array(texts, pa.string())],
        schema=LABELS_SCHEMA,
    )


def read_filter_file(uri: str, num_test: int, num_labels: int) -> np.ndarray:
    """``filter_labels_test.txt`` as an int64 array [n, 2] of (test row, label); out-of-range pairs raise."""
    pairs: list[tuple[int, int]] = []
    with open_lines(uri) as lines:
        for lineno, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 2:
                    raise ValueError
                r, c = int(parts[0]), int(parts[1])
            except ValueError:
                raise InputError(uri, lineno, f"expected 'test_row label', got {line.strip().decode()!r}") \
                    from None
            if not (0 <= r < num_test and 0 <= c < num_labels):
                raise InputError(uri, lineno, f"pair ({r}, {c}) outside {num_test} test rows x {num_labels} labels")
            pairs.append((r, c))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
