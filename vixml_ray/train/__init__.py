"""Training: triplet loss with in-batch hard negatives, balanced clustering, the global batch sampler, the loop.

Public API::

    train(cfg, run_dir=None, resume=True) -> dict           # single process (vixml_ray.train.local)
    train_loop(cfg, runtime, make_engine=torch_engine)      # one worker of any runtime (vixml_ray.train.loop)
    triplet_loss(q, labels, pos_index, positive_mask, cfg)  # vixml_ray.train.loss
    balanced_clusters(x, cluster_size, seed)                # vixml_ray.train.clustering
"""

from vixml_ray.train.clustering import balanced_clusters
from vixml_ray.train.local import train
from vixml_ray.train.loop import train_loop
from vixml_ray.train.loss import TripletLossConfig, triplet_loss

__all__ = ["TripletLossConfig", "balanced_clusters", "train", "train_loop", "triplet_loss"]
