"""Evaluation: pyxclib-compatible metrics (the evaluation pipeline and reports build on them)."""

from vixml_ray.eval.metrics import inverse_propensity, xmc_metrics

__all__ = ["inverse_propensity", "xmc_metrics"]
