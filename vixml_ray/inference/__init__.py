"""Inference with a trained export, below the index: reading an export (:mod:`.export`), embedding texts and images
in batches (:mod:`.batch`, also as a Ray Data actor pool) and turning a query's images into features
(:mod:`.images`). The index, evaluation and the predictor build on it."""
