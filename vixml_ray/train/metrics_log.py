"""Per-epoch training metrics (rank 0 of a Ray Train run, or the local runtime): ``metrics.jsonl``, TensorBoard event
files and a PNG of the curves. The one writer of ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import pyarrow.fs as pafs

from vixml_ray import storage

METRICS_FILE, CURVES_FILE, TENSORBOARD_DIR = "metrics.jsonl", "curves.png", "tensorboard"
PLOTTED = ("loss", "samples_per_s", "val_P@1", "val_P@5")


class MetricsLog:
    """Writes into ``run_dir`` (a local path, or a URI: then into a local folder copied there on every plot)."""

    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.local_dir = run_dir if storage.is_local(run_dir) else tempfile.mkdtemp(prefix="vixml-metrics-")
        os.makedirs(self.local_dir, exist_ok=True)
        remote = storage.join(run_dir, METRICS_FILE)
        if self.local_dir != run_dir and storage.exists(remote):  # a resumed run continues the remote log
            storage.write_text(os.path.join(self.local_dir, METRICS_FILE), storage.read_text(remote))
        self.history: list[dict[str, Any]] = _read_history(os.path.join(self.local_dir, METRICS_FILE))
        self.writer = SummaryWriter(os.path.join(self.local_dir, TENSORBOARD_DIR))

    def append(self, metrics: dict[str, Any]) -> None:
        """Adds one report. A run restarted from a checkpoint reports again the epochs after it: their lines from
        the lost attempt (``step`` >= this one's) are dropped, so the log holds each epoch once."""
        step = int(metrics.get("step", len(self.history) + 1))
        replay = any(int(h.get("step", 0)) >= step for h in self.history)
        if replay:
            self.history = [h for h in self.history if int(h.get("step", 0)) < step]
        self.history.append(dict(metrics))
        path = os.path.join(self.local_dir, METRICS_FILE)
        if replay:  # rewritten in one step: a crash now leaves the old log or the new one
            storage.write_text(path, "".join(_line(h) for h in self.history))
        else:
            with open(path, "a", encoding="utf-8") as f:
                f.write(_line(metrics))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.writer.add_scalar(key.replace("@", "_at_"), float(value), step)
        self.writer.flush()

    def plot(self) -> str:
        """Draws the curves to ``curves.png``; returns its path (local or URI)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in PLOTTED if any(k in h for h in self.history)]
        fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            points = [(h["epoch"] + 1, h[key]) for h in self.history if key in h]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            ax.set_title(key)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(self.local_dir, CURVES_FILE)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self._sync()
        return storage.join(self.run_dir, CURVES_FILE)

    def close(self) -> None:
        self.writer.close()
        self._sync()

    def _sync(self) -> None:
        if self.local_dir == self.run_dir:
            return
        fs, path = storage.filesystem(self.run_dir)
        pafs.copy_files(self.local_dir, path, destination_filesystem=fs)


def _line(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, sort_keys=True, default=float) + "\n"


def _read_history(path: str) -> list[dict[str, Any]]:
    """Earlier epochs of a resumed run (the curves then cover the whole run)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
