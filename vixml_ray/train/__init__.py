"""Training: triplet loss with in-batch hard negatives, balanced clustering, the global batch sampler, the loop.

Public API (``train`` is imported lazily, so the light modules do not pull in torch and transformers)::

    train(cfg, run_dir=None, resume=True) -> dict                 # vixml_ray.train.local: one process
    train_loop(cfg, runtime, make_engine=torch_engine) -> dict    # vixml_ray.train.loop: one worker of any runtime
    triplet_loss(q, labels, pos_index, positive_mask, cfg)        # vixml_ray.train.loss
    balanced_clusters(x, cluster_size, seed) -> ids               # vixml_ray.train.clustering
    GlobalBatchSampler, ClusterSchedule, slice_bounds             # vixml_ray.train.sampler
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "train":
        from vixml_ray.train.local import train

        return train
    raise AttributeError(f"module 'vixml_ray.train' has no attribute '{name}'")
