"""The training loop's side effects: where metrics and checkpoints go, where to resume from, which device to use.

The loop only talks to a :class:`Runtime`. :class:`LocalRuntime` keeps everything in a run directory on local disk
(one process); a Ray Train runtime implements the same four members with ``ray.train.report(metrics,
checkpoint=...)``, ``ray.train.get_checkpoint()`` and Ray Train's device, so the loop runs unchanged in both.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Protocol

import torch

from vixml_ray import storage
from vixml_ray.train import dist
from vixml_ray.train.metrics_log import MetricsLog

log = logging.getLogger(__name__)


class Runtime(Protocol):
    device: torch.device
    output_dir: str  # where the loop publishes the inference export (local path or URI)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Called by EVERY rank the same number of times; ``checkpoint_dir`` is this rank's local directory with its
        part of the checkpoint (ranks write distinct file names), or None."""
        ...

    def latest_checkpoint(self) -> str | None:
        """A local directory holding the checkpoint to resume from (all ranks' parts), or None."""
        ...


class LocalRuntime:
    """One process: metrics in ``<run_dir>/metrics.jsonl`` (a :class:`MetricsLog`: epochs replayed after a resume
    replace their earlier lines), checkpoints published as ``<run_dir>/checkpoints/step-<n>`` (the newest
    ``num_to_keep`` kept), the export at ``<run_dir>/export``."""

    def __init__(self, run_dir: str, num_to_keep: int = 2, resume: bool = True, device: str | None = None):
        if dist.is_distributed():
            raise RuntimeError("LocalRuntime runs one process; use the Ray Train runtime for several workers")
        self.run_dir = run_dir
        self.output_dir = os.path.join(run_dir, "export")
        self.num_to_keep = num_to_keep
        self.resume = resume
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        self.metrics_log = MetricsLog(run_dir)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.metrics_log.append(metrics)
        log.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        if checkpoint_dir is None:
            return
        target = os.path.join(self.run_dir, "checkpoints", f"step-{int(metrics['step']):09d}")
        with storage.publish(target, overwrite=True) as staging:
            shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)
        for old in self._checkpoints()[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> str | None:
        found = self._checkpoints() if self.resume else []
        return found[-1] if found else None

    def close(self) -> None:
        self.metrics_log.close()

    def _checkpoints(self) -> list[str]:
        root = os.path.join(self.run_dir, "checkpoints")
        names = sorted(n for n in os.listdir(root) if re.fullmatch(r"step-\d{9}", n))
        return [os.path.join(root, n) for n in names]
