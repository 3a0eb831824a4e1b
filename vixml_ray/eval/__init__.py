"""Evaluation: pyxclib-compatible metrics (the evaluation pipeline and reports build on them)."""

from vixml_ray.eval.metrics import filter_predictions, inverse_propensity, xmc_metrics

__all__ = ["filter_predictions", "inverse_propensity", "xmc_metrics"]
