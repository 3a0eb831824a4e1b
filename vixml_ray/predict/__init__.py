"""Prediction over a label index: the in-process :class:`~.predictor.Predictor` (embed raw queries, search the
sharded index, optionally retrieval-augmented) and JSONL batch prediction (:func:`~.jsonl.predict_file`)."""

from vixml_ray.predict.jsonl import predict_file
from vixml_ray.predict.predictor import Prediction, Predictor, Query

__all__ = ["Prediction", "Predictor", "Query", "predict_file"]
