"""Running the predictor over a JSONL file of queries (``jobs/predict.py``).

Input, one JSON object per line::

    {"id": "q1", "text": "red enamel pot", "images": ["img/q1.jpg", "https://...", {"b64": "<base64 bytes>"}]}

``text`` is required; ``id`` is optional and echoed; ``images`` (optional, at most 3, slot order) holds paths
(relative ones resolve against the queries file's folder), URIs, URLs or ``{"b64": ...}`` inline bytes. Output, one
line per non-blank input line, in input order::

    {"line": 1, "id": "q1", "labels": [...], "names": [...], "scores": [...], "version": "v3", "image_errors": [...]}

A line that is not a valid query gets ``{"line": n, "error": "<file>:<n>: ..."}`` and is counted; the job goes on.
The output file appears complete or not at all (:func:`vixml_ray.storage.atomic_file`).
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import time
from collections import Counter
from typing import Any, Iterator

from vixml_ray import storage
from vixml_ray.config import Config
from vixml_ray.data.schema import MAX_IMAGES
from vixml_ray.errors import InputError, OutputExistsError
from vixml_ray.inference.export import absolute_uri, job_config
from vixml_ray.predict.predictor import Predictor, Query
from vixml_ray.ray_utils import init_ray_for


def parse_query(line: bytes | str, path: str, lineno: int) -> tuple[Any, Query]:
    """(id, Query) of one JSONL line; raises :class:`InputError` naming the file, the line and the key."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(path, lineno, f"not JSON: {err.msg} at column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise InputError(path, lineno, f"not UTF-8: {err.reason} at byte {err.start}") from None
    if not isinstance(obj, dict):
        raise InputError(path, lineno, f"a query must be a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise InputError(path, lineno, f"key 'text' must be a string, got {type(text).__name__}")
    images = obj.get("images", [])
    if not isinstance(images, list) or len(images) > MAX_IMAGES:
        raise InputError(path, lineno, f"key 'images' must be a list of at most {MAX_IMAGES} images")
    parsed: list[bytes | str] = []
    for slot, image in enumerate(images):
        if isinstance(image, str) and image:
            parsed.append(image)
        elif isinstance(image, dict) and set(image) == {"b64"} and isinstance(image["b64"], str):
            try:
                parsed.append(base64.b64decode(image["b64"], validate=True))
            except binascii.Error as err:
                raise InputError(path, lineno, f"key 'images[{slot}].b64' is not base64: {err}") from None
        else:
            raise InputError(path, lineno, f"key 'images[{slot}]' must be a path/URI/URL string or {{\"b64\": ...}}")
    return obj.get("id"), Query(text, tuple(parsed))


def _lines(uri: str) -> Iterator[str]:
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as raw, io.BufferedReader(raw) as f:  # decoded per line: a bad one is skipped
        yield from f


def predict_file(export_uri: str, index_dir: str, queries_uri: str, out_uri: str, k: int = 10,
                 cfg: Config | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Predicts the top ``k`` labels of every query line of ``queries_uri`` into ``out_uri``; returns the summary."""
    started = time.perf_counter()
    if storage.exists(out_uri) and not overwrite:
        raise OutputExistsError(out_uri)
    cfg = cfg or job_config(export_uri)
    init_ray_for(cfg)
    queries_uri = absolute_uri(queries_uri)
    base = queries_uri.rsplit("/", 1)[0]
    counts: Counter[str] = Counter()
    image_errors: Counter[str] = Counter()
    versions: set[str] = set()
    with Predictor(export_uri, index_dir, cfg, base_uri=base) as predictor, storage.atomic_file(out_uri) as tmp, \
            open(tmp, "w", encoding="utf-8") as out:
        ready = time.perf_counter()
        numbered = ((n, line) for n, line in enumerate(_lines(queries_uri), start=1) if line.strip())
        while chunk := list(itertools.islice(numbered, cfg.infer.batch_size)):
            records: list[dict[str, Any]] = []
            valid: list[tuple[int, Query]] = []
            for n, line in chunk:
                try:
                    query_id, query = parse_query(line, queries_uri, n)
                except InputError as err:
                    records.append({"line": n, "error": str(err)})
                    counts["skipped"] += 1
                    continue
                records.append({"line": n, "id": query_id})
                valid.append((len(records) - 1, query))
            for (at, _), prediction in zip(valid, predictor.predict([q for _, q in valid], k)):
                records[at].update(labels=prediction.ids, names=prediction.names, scores=prediction.scores,
                                   version=prediction.version, image_errors=prediction.image_errors)
                image_errors.update(e for e in prediction.image_errors if e)
                versions.add(prediction.version)
            counts["predicted"] += len(valid)
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        predict_s = time.perf_counter() - ready
    return {"queries": counts["predicted"] + counts["skipped"], "predicted": counts["predicted"],
            "skipped": counts["skipped"], "image_errors": dict(image_errors), "versions": sorted(versions), "k": k,
            "raa": cfg.infer.raa.enabled,
            "queries_per_s": round(counts["predicted"] / predict_s, 2) if predict_s > 0 else 0.0,
            "seconds": round(time.perf_counter() - started, 2), "out": out_uri}
