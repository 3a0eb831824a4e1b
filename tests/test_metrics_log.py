"""The run's metrics log: one line per epoch, also after a restart that reports again the epochs after its
checkpoint; TensorBoard events and the curves PNG next to it."""

from __future__ import annotations

import json
from pathlib import Path

from vixml_ray.train.metrics_log import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsLog


def _lines(run_dir: Path) -> list[tuple[int, float]]:
    return [(d["step"], d["loss"]) for d in map(json.loads, (run_dir / METRICS_FILE).read_text().splitlines())]


def test_a_restarted_run_replaces_the_epochs_it_reports_again(tmp_path: Path) -> None:
    first = MetricsLog(str(tmp_path))
    for epoch, loss in enumerate([0.9, 0.5, 0.4]):  # the attempt dies after epoch 2; its checkpoint is epoch 0's
        first.append({"epoch": epoch, "step": 10 * (epoch + 1), "loss": loss})
    first.close()

    again = MetricsLog(str(tmp_path))  # the restarted worker: resumes at step 10, reports epochs 1 and 2 again
    assert len(again.history) == 3
    again.append({"epoch": 1, "step": 20, "loss": 0.45})
    assert _lines(tmp_path) == [(10, 0.9), (20, 0.45)]
    again.append({"epoch": 2, "step": 30, "loss": 0.3})
    assert _lines(tmp_path) == [(10, 0.9), (20, 0.45), (30, 0.3)]
    assert [h["step"] for h in again.history] == [10, 20, 30]
    again.plot()
    again.close()
    assert (tmp_path / CURVES_FILE).stat().st_size > 0
    assert any((tmp_path / TENSORBOARD_DIR).iterdir())
