"""Inference with a trained export: batch embedding in Ray Data, the online predictor, JSONL prediction.

Public API (imported lazily: :mod:`vixml_ray.index.refresh` uses :mod:`vixml_ray.serve.batch`, and the predictor
uses the refresh's version files)::

    read_export(uri) -> Export;  job_config(export_uri, config_path, overrides) -> Config
    Predictor(export_uri, index_dir, cfg=None, base_uri=None).predict([Query(text, images)], k) -> [Prediction]
    predict_file(export_uri, index_dir, queries_uri, out_uri, k=10, cfg=None, overwrite=False) -> dict
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "Export": "vixml_ray.serve.export",
    "job_config": "vixml_ray.serve.export",
    "read_export": "vixml_ray.serve.export",
    "Prediction": "vixml_ray.serve.predictor",
    "Predictor": "vixml_ray.serve.predictor",
    "Query": "vixml_ray.serve.predictor",
    "predict_file": "vixml_ray.serve.jsonl",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'vixml_ray.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
