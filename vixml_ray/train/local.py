"""The single-process training entry point: the same loop as a Ray Train worker, run in this process."""

from __future__ import annotations

import os
from typing import Any

from vixml_ray import storage
from vixml_ray.config import Config, save_config
from vixml_ray.train.loop import train_loop
from vixml_ray.train.runtime import LocalRuntime


def train(cfg: Config, run_dir: str | None = None, resume: bool = True) -> dict[str, Any]:
    """Trains ``cfg`` in this process (resuming from ``run_dir``'s latest checkpoint when ``resume``).

    Writes ``config.yaml``, ``metrics.jsonl``, TensorBoard events, ``curves.png``, ``checkpoints/`` and
    ``summary.json`` into ``run_dir`` (default ``<out_dir>/train``) and publishes the inference export at
    ``<run_dir>/export``; returns the summary (``first_loss``, ``final_loss``, ``samples_per_s``, ``val_P@k``,
    ``test_*``, ``checkpoint`` = the export).
    """
    run_dir = run_dir or os.path.join(cfg.out_dir, "train")
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    device = "cuda" if cfg.train.use_gpu else "cpu"
    runtime = LocalRuntime(run_dir, num_to_keep=cfg.train.num_to_keep, resume=resume, device=device)
    try:
        summary = train_loop(cfg, runtime)
        runtime.metrics_log.plot()
    finally:
        runtime.close()
    storage.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary
