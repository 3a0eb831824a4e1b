"""The built-in end-to-end run behind ``make demo``: the whole pipeline on synthetic multimodal data.

synthetic dataset -> embed_images (Ray Data) -> train text-only and text+image (Ray Train) -> refresh_labels (Ray
Data into a versioned label index) -> evaluate (sharded FAISS top-k, pyxclib metrics) -> a comparison table and PNG
-> the text+image model served over HTTP (Ray Serve) answering three test queries.
The synthetic labels are (topic, attribute) pairs whose attribute only the images show, so text-only P@1 is capped
near 1 / num_attributes while text+image can pass it.

Outputs under ``out_dir``: ``<variant>/`` (the Ray Train run with its ``export/``, plus ``label-index/`` and
``eval/``) per variant and ``demo.png``. Every run trains afresh: a previous demo run of a variant is replaced (the
dataset and its image features are cached under ``cache_dir`` and reused).
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import ray

from vixml_ray import storage
from vixml_ray.config import Config, replace
from vixml_ray.pipeline import ensure_dataset
from vixml_ray.ray_utils import init_ray_for
from vixml_ray.inference.export import absolute_uri

log = logging.getLogger(__name__)

VARIANTS = {"text_only": {"model.use_images": False}, "text_image": {"model.use_images": True}}
LABELS = {"text_only": "text-only", "text_image": "text+image"}
COLORS = {"text_only": "#9e9e9e", "text_image": "#1f77b4"}
SHOWN = ("P@1", "P@5", "PSP@5")


def run_demo(cfg: Config) -> dict[str, Any]:
    """Runs every stage for both variants; returns ``{variant: {P@1, P@5, PSP@5 (percent), train_s, train_wall_s},
    "plot": PATH}``. ``train_s`` is the training workers' loop, ``train_wall_s`` adds Ray Train's start-up."""
    from vixml_ray.eval.evaluate import evaluate
    from vixml_ray.index.refresh import refresh_labels
    from vixml_ray.train.ray_train import fit

    started_ray = not ray.is_initialized()
    init_ray_for(cfg)
    out = absolute_uri(cfg.out_dir)
    ceiling = text_only_ceiling(cfg)
    cfg = ensure_dataset(replace(cfg, **{"model.use_images": True}))
    results: dict[str, Any] = {}
    for name, changes in VARIANTS.items():
        variant = replace(cfg, **{**changes, "out_dir": out})
        for previous in {storage.join(out, name), storage.join(variant.ray.storage_path or out, name)}:
            if storage.exists(previous):
                log.info("replacing the previous demo run %s", previous)
                storage.remove(previous)
        start = time.perf_counter()
        summary = fit(variant, run_name=name)
        wall = time.perf_counter() - start
        index_dir = storage.join(out, name, "label-index")
        refresh_labels(summary["checkpoint"], variant.data.dataset, index_dir)
        metrics = evaluate(summary["checkpoint"], variant.data.dataset, storage.join(out, name, "eval"),
                           index_dir=index_dir)
        results[name] = {**{key: round(100 * float(metrics[key]), 2) for key in SHOWN},
                         "train_s": round(float(summary["loop_s"]), 1), "train_wall_s": round(wall, 1)}
        served = (variant, summary["checkpoint"], index_dir)
    results["plot"] = plot_comparison(results, storage.join(out, "demo.png"), ceiling)
    results["served"] = serve_queries(*served)
    if started_ray:
        ray.shutdown()  # no log line of a Ray worker can arrive after the table
    print(comparison_table(results), f"plot: {results['plot']}", sep="\n", flush=True)
    return results


def serve_queries(cfg: Config, checkpoint: str, index_dir: str, count: int = 3) -> list[dict[str, Any]]:
    """Starts the online service (:mod:`vixml_ray.serve`) on the export, sends the first ``count`` test queries
    (text + images as data URIs) over HTTP, prints the answers and stops the service; returns the answers."""
    import base64

    import requests

    from vixml_ray.data.dataset import open_dataset
    from vixml_ray.serve.app import application
    from vixml_ray.serve.run import start, stop

    ds = open_dataset(cfg.data.dataset)
    images: list[list[str]] = [[] for _ in range(count)]
    for entry in sorted(ds.image_manifest().to_pylist(), key=lambda m: (m["row"], m["slot"])):
        uri = ds.image_uri(entry["uri"])
        if entry["split"] == "test" and entry["row"] < count and storage.exists(uri):
            fs, path = storage.filesystem(uri)
            with fs.open_input_stream(path) as f:
                images[entry["row"]].append("data:image/png;base64," + base64.b64encode(f.read()).decode())
    queries = [{"text": text, "images": slots} for text, slots in zip(ds.texts("test")[:count], images)]
    url = start(cfg, application(checkpoint, index_dir, cfg))
    try:
        response = requests.post(f"{url}/v1/predict", json={"queries": queries, "k": 3}, timeout=120)
        response.raise_for_status()
        answer = response.json()
    finally:
        stop()
    print(f"served by {url} (index version {answer['version']}):", flush=True)
    for query, result in zip(queries, answer["results"]):
        labels = ", ".join(f"{label['name']} ({label['score']:.3f})" for label in result["labels"])
        print(f"  {query['text']!r} + {len(query['images'])} image(s) -> {labels}", flush=True)
    return answer["results"]


def text_only_ceiling(cfg: Config) -> float | None:
    """Expected best text-only P@1 (percent) on the built-in synthetic data, None for a real dataset."""
    if cfg.data.dataset or cfg.data.source:
        return None
    return 100.0 / cfg.data.synthetic.num_attributes


def comparison_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per variant, the shown metrics in percent and the training times."""
    lines = ["| variant | " + " | ".join(SHOWN) + " | train s | with Ray start-up s |",
             "|---|" + "---:|" * (len(SHOWN) + 2)]
    for name in VARIANTS:
        row = results[name]
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{row[k]:.2f}" for k in SHOWN)
                     + f" | {row['train_s']:.1f} | {row['train_wall_s']:.1f} |")
    return "\n".join(lines)


def plot_comparison(results: dict[str, Any], path: str, ceiling: float | None = None) -> str:
    """Left: grouped bars of P@1, P@5, PSP@5 (percent) per variant, with the text-only P@1 ceiling of the
    synthetic data when given. Right: training time per variant, the loop and Ray Train's start-up stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(VARIANTS)
    fig, (ax, ax_time) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [3, 1.2]})
    x = np.arange(len(SHOWN))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name][k] for k in SHOWN]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=LABELS[name],
                      color=COLORS[name])
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    if ceiling is not None:
        ax.hlines(ceiling, -0.42, 0.42, colors="black", linestyles="--", linewidth=1,
                  label=f"text-only P@1 ceiling ~{ceiling:.0f} (only the images show the attribute)")
    top = max(results[n][k] for n in names for k in SHOWN)
    ax.set_ylim(0, max(top * 1.25, 1.0))
    ax.set_xticks(x, SHOWN)
    ax.set_ylabel("percent (test split)")
    ax.set_title("Retrieval quality")
    ax.legend(loc="upper left", frameon=False, fontsize=9)

    loops = [results[n]["train_s"] for n in names]
    startup = [max(results[n]["train_wall_s"] - results[n]["train_s"], 0.0) for n in names]
    positions = np.arange(len(names))
    ax_time.bar(positions, loops, 0.6, color=[COLORS[n] for n in names], label="training loop (solid)")
    ax_time.bar(positions, startup, 0.6, bottom=loops, color="none", edgecolor="black", hatch="//",
                label="Ray Train start-up")
    for pos, loop, extra in zip(positions, loops, startup):
        ax_time.annotate(f"{loop:.0f} + {extra:.0f}", (pos, loop + extra), xytext=(0, 2), textcoords="offset points",
                         ha="center", fontsize=8)
    ax_time.set_ylim(0, max(a + b for a, b in zip(loops, startup)) * 1.45 or 1.0)
    ax_time.set_xticks(positions, [LABELS[n] for n in names])
    ax_time.set_ylabel("seconds")
    ax_time.set_title("Training time")
    ax_time.legend(loc="upper center", frameon=False, fontsize=8)
    fig.suptitle("ViXML demo: text-only vs text+image (early image fusion)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return path
