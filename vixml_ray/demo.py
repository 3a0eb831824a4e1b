"""The built-in end-to-end run behind ``make demo``: the whole pipeline on synthetic multimodal data.

synthetic dataset -> embed_images (Ray Data) -> train text-only and text+image (Ray Train) -> refresh_labels (Ray
Data into a versioned label index) -> evaluate (sharded FAISS top-k, pyxclib metrics) -> a comparison table and PNG.
The synthetic labels are (topic, attribute) pairs whose attribute only the images show, so text-only P@1 is capped
near 1 / num_attributes while text+image can pass it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from vixml_ray import storage
from vixml_ray.config import Config, replace
from vixml_ray.pipeline import ensure_dataset
from vixml_ray.ray_utils import init_ray

log = logging.getLogger(__name__)

VARIANTS = {"text_only": {"model.use_images": False}, "text_image": {"model.use_images": True}}
SHOWN = ("P@1", "P@5", "PSP@5")


def run_demo(cfg: Config) -> dict[str, Any]:
    """Runs every stage for both variants; returns ``{variant: {P@1, P@5, PSP@5, train_s}, "plot": PATH}``."""
    from vixml_ray.eval.evaluate import evaluate
    from vixml_ray.index.refresh import refresh_labels
    from vixml_ray.train.ray_train import fit

    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.object_store_memory)
    out = os.path.abspath(cfg.out_dir)
    cfg = ensure_dataset(replace(cfg, **{"model.use_images": True}))
    results: dict[str, Any] = {}
    for name, changes in VARIANTS.items():
        variant = replace(cfg, **changes)
        start = time.perf_counter()
        summary = fit(variant, run_name=name)
        train_s = time.perf_counter() - start
        index_dir = storage.join(out, name, "label-index")
        refresh_labels(summary["checkpoint"], variant.data.dataset, index_dir, incremental=True)
        metrics = evaluate(summary["checkpoint"], variant.data.dataset, storage.join(out, name, "eval"),
                           index_dir=index_dir, overwrite=True)
        results[name] = {**{key: round(100 * float(metrics[key]), 2) for key in SHOWN}, "train_s": round(train_s, 1)}
    results["plot"] = plot_comparison(results, os.path.join(out, "demo.png"))
    print(comparison_table(results), flush=True)
    return results


def comparison_table(results: dict[str, Any]) -> str:
    header = "| variant | " + " | ".join(SHOWN) + " | train s |"
    lines = [header, "|" + "---|" * (len(SHOWN) + 2)]
    for name in VARIANTS:
        row = results[name]
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in SHOWN) + f" | {row['train_s']:.1f} |")
    return "\n".join(lines)


def plot_comparison(results: dict[str, Any], path: str) -> str:
    """Grouped bars of P@1, P@5 and PSP@5 (percent) per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(VARIANTS)
    x = np.arange(len(SHOWN))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, name in enumerate(names):
        values = [results[name][k] for k in SHOWN]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name.replace("_", " "))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, SHOWN)
    ax.set_ylabel("percent")
    ax.set_title("ViXML demo: text-only vs text+image (synthetic test split)")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
