"""The demo's report: the comparison table, the PNG and the text-only ceiling (the pipeline itself is `make demo`)."""

from __future__ import annotations

from vixml_ray.config import load_config, replace
from vixml_ray.demo import VARIANTS, comparison_table, plot_comparison, text_only_ceiling

RESULTS = {
    "text_only": {"P@1": 19.67, "P@5": 17.87, "PSP@5": 89.21, "train_s": 9.2, "train_wall_s": 38.0},
    "text_image": {"P@1": 71.0, "P@5": 19.47, "PSP@5": 97.32, "train_s": 6.9, "train_wall_s": 27.5},
}


def test_table_has_one_row_per_variant_in_order():
    lines = comparison_table(RESULTS).splitlines()
    assert lines[0] == "| variant | P@1 | P@5 | PSP@5 | train s | with Ray start-up s |"
    assert lines[2:] == ["| text-only | 19.67 | 17.87 | 89.21 | 9.2 | 38.0 |",
                         "| text+image | 71.00 | 19.47 | 97.32 | 6.9 | 27.5 |"]
    assert len(lines) == 2 + len(VARIANTS)


def test_plot_writes_a_png(tmp_path):
    path = plot_comparison(RESULTS, str(tmp_path / "sub" / "demo.png"), ceiling=25.0)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ceiling_only_for_the_builtin_synthetic_data():
    cfg = load_config("demo", [])
    assert text_only_ceiling(cfg) == 100.0 / cfg.data.synthetic.num_attributes
    assert text_only_ceiling(replace(cfg, **{"data.dataset": "/some/prepared/dataset"})) is None
