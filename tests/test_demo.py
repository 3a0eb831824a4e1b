"""The demo behind ``make demo`` run for real at a small size (fewer items, 1 epoch): both variants train, index,
evaluate and report; the table printed and the PNG written hold the returned figures. The text-only ceiling applies
to the built-in synthetic data only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vixml_ray.config import load_config, replace
from vixml_ray.demo import LABELS, SHOWN, VARIANTS, run_demo, text_only_ceiling


@pytest.mark.slow
def test_run_demo_small(ray_session: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # training in the driver (num_workers=0) spares two Ray Train start-ups; the 2-worker path is test_distributed's
    # (and gives these runs' losses and metrics too: the same global batches)
    cfg = load_config("demo", [f"out_dir={tmp_path / 'demo'}", f"cache_dir={tmp_path / 'cache'}",
                               "data.synthetic.num_train=480", "data.synthetic.num_test=120", "train.epochs=1",
                               "train.num_workers=0"])
    chance = 100.0 / (cfg.data.synthetic.num_topics * cfg.data.synthetic.num_attributes)  # P@1 of a random ranking
    threads = torch.get_num_threads()
    try:
        results = run_demo(cfg)
    finally:
        torch.set_num_threads(threads)  # the loop sets torch threads to cpus_per_worker: here, this process

    assert set(results) == {*VARIANTS, "plot", "served"}
    # the text+image model answered three test queries over HTTP: three ranked labels each, best first
    assert len(results["served"]) == 3
    for answer in results["served"]:
        scores = [label["score"] for label in answer["labels"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True), answer
    for name in VARIANTS:
        row = results[name]
        assert set(row) == {*SHOWN, "train_s", "train_wall_s"}, name
        assert all(0.0 <= row[key] <= 100.0 for key in SHOWN), row
        # one label per item: the top 5 hold at most one hit (P@5 <= 20) and hold the top 1's (P@5 >= P@1 / 5)
        assert row["P@1"] / 5 - 0.01 <= row["P@5"] <= 20.0 and row["PSP@5"] > 0.0, row
        assert row["P@1"] > 5 * chance, row  # one epoch learns something (measured: 14 text-only, 22 with images)
        assert 0.0 < row["train_s"] <= row["train_wall_s"], row
        variant_dir = tmp_path / "demo" / name
        assert (variant_dir / "label-index").is_dir()
        at_k = json.loads((variant_dir / "eval" / "metrics.json").read_text())["at_k"]  # what evaluate wrote
        shown = [key.split("@") for key in SHOWN]
        assert [row[key] for key in SHOWN] == [round(100 * at_k[metric][int(k) - 1], 2) for metric, k in shown]
        assert at_k["R"][4] == pytest.approx(5 * at_k["P"][4])  # one label per item: R@5 = 5 P@5
    assert results["plot"] == str(tmp_path / "demo" / "demo.png")
    assert Path(results["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    printed = capsys.readouterr().out
    for name in VARIANTS:
        line = next(line for line in printed.splitlines() if line.startswith(f"| {LABELS[name]} |"))
        assert f"| {results[name]['P@1']:.2f} | {results[name]['P@5']:.2f} |" in line, line
    assert f"plot: {results['plot']}" in printed


def test_ceiling_only_for_the_builtin_synthetic_data():
    cfg = load_config("demo", [])
    assert text_only_ceiling(cfg) == 100.0 / cfg.data.synthetic.num_attributes
    assert text_only_ceiling(replace(cfg, **{"data.dataset": "/some/prepared/dataset"})) is None
