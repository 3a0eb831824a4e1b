"""The demo behind ``make demo`` run for real at a small size (fewer items, 1 epoch): both variants train, index,
evaluate and report; the table printed and the PNG written hold the returned figures. The text-only ceiling applies
to the built-in synthetic data only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vixml_ray.config import load_config, replace
from vixml_ray.demo import SHOWN, VARIANTS, run_demo, text_only_ceiling


@pytest.mark.slow
def test_run_demo_small(ray_session: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config("demo", [f"out_dir={tmp_path / 'demo'}", f"cache_dir={tmp_path / 'cache'}",
                               "data.synthetic.num_train=480", "data.synthetic.num_test=120", "train.epochs=1"])
    results = run_demo(cfg)

    assert set(results) == {*VARIANTS, "plot"}
    for name in VARIANTS:
        row = results[name]
        assert set(row) == {*SHOWN, "train_s", "train_wall_s"}, name
        assert all(0.0 <= row[key] <= 100.0 for key in SHOWN), row
        # one label per item: the top 5 hold at most one hit (P@5 <= 20) and hold the top 1's (P@5 >= P@1 / 5)
        assert row["P@1"] / 5 - 0.01 <= row["P@5"] <= 20.0 and row["PSP@5"] > 0.0, row
        assert 0.0 < row["train_s"] <= row["train_wall_s"], row
        variant_dir = tmp_path / "demo" / name
        assert (variant_dir / "eval").is_dir() and (variant_dir / "label-index").is_dir()
    assert results["plot"] == str(tmp_path / "demo" / "demo.png")
    assert Path(results["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    printed = capsys.readouterr().out
    for name, label in (("text_only", "| text-only |"), ("text_image", "| text+image |")):
        line = next(line for line in printed.splitlines() if line.startswith(label))
        assert f"| {results[name]['P@1']:.2f} | {results[name]['P@5']:.2f} |" in line, line
    assert f"plot: {results['plot']}" in printed


def test_ceiling_only_for_the_builtin_synthetic_data():
    cfg = load_config("demo", [])
    assert text_only_ceiling(cfg) == 100.0 / cfg.data.synthetic.num_attributes
    assert text_only_ceiling(replace(cfg, **{"data.dataset": "/some/prepared/dataset"})) is None
