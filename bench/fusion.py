"""Does early visual fusion pay? The same small encoder trained text-only, text+image, and text+image with every
item's image features shuffled across the items of its split (a control: same image statistics, no relation to the
text or the labels), on the synthetic multimodal dataset, with the same budget (epochs, batches, seed).

The synthetic labels are (topic, attribute) pairs; the text names the topic only and the images show the attribute,
so text-only P@1 is capped near 1 / num_attributes, text+image can pass it, and the shuffled control should not.
Each variant runs the production training loop in this process (``vixml_ray.train.local.train``: clustered hard
negatives, validation, the test split once at the end by brute force with the filter pairs removed); the images
are embedded once by the Ray Data pipeline with the tiny vision tower. ``popularity_p1`` ranks labels by their
training frequency for every query.

    python bench/fusion.py [--quick] [--out DIR]

Last line: JSON with ``text_only_p1``, ``text_image_p1``, ``shuffled_image_p1``, ``popularity_p1`` (percent), the
per-variant training seconds and ``seconds`` (the whole run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from vixml_ray.config import Config, load_config, replace  # noqa: E402
from vixml_ray.data import schema  # noqa: E402
from vixml_ray.data.dataset import open_dataset  # noqa: E402
from vixml_ray.data.filters import filter_predictions  # noqa: E402
from vixml_ray.eval.metrics import xmc_metrics  # noqa: E402
from vixml_ray.pipeline import ensure_dataset  # noqa: E402
from vixml_ray.ray_utils import init_ray_for  # noqa: E402
from vixml_ray.train.local import train  # noqa: E402
from vixml_ray.vision.bank import FeatureBank  # noqa: E402

SHUFFLE_SEED = 1234

# (synthetic items, epochs): --quick finishes within two minutes on 2 cores
SIZES = {"quick": (1200, 5), "full": (6000, 8)}


def bench_config(out_dir: str, cache_dir: str, num_train: int, epochs: int) -> Config:
    """The tiny preset's data and vision tower with a small random BERT encoder, fully fine-tuned, one process."""
    return load_config("tiny", [
        f"out_dir={out_dir}", f"cache_dir={cache_dir}",
        f"data.synthetic.num_train={num_train}", f"data.synthetic.num_test={max(300, num_train // 4)}",
        "model.name_or_path=tiny:bert", "model.kind=encoder", "model.lora.enabled=false", "model.max_length=16",
        f"train.epochs={epochs}", "train.batch_size=64", "train.lr_backbone=0.001", "train.lr_projection=0.003",
        "train.warmup_steps=10", "train.cluster.start_epoch=2", "train.cluster.refresh_every=2",
        "train.cluster.initial_size=8", f"train.cluster.double_at=[{epochs}]",
        f"train.checkpoint_every_epochs={epochs}", f"train.eval_every_epochs={epochs}",
        "train.num_workers=1", "train.cpus_per_worker=2",
    ])


def shuffled_copy(dataset: str, target: str, seed: int = SHUFFLE_SEED) -> str:
    """A copy of ``dataset`` whose feature bank gives each item (query or label) the image slots of another item
    of the same split, by a fixed random permutation per split."""
    shutil.copytree(dataset, target, dirs_exist_ok=True)
    bank = FeatureBank.open(target)
    rng = np.random.default_rng(seed)
    for split in schema.SPLITS:
        path = os.path.join(bank.bank_dir, f"{split}_index.npy")
        index = np.load(path)
        np.save(path, index[rng.permutation(len(index))])
    return target


def popularity_p1(dataset: str) -> float:
    """P@1 (percent) of ranking every label by its number of training items, filter pairs removed."""
    ds = open_dataset(dataset)
    counts = np.asarray(ds.label_matrix("train").sum(axis=0)).ravel()
    order = np.argsort(-counts, kind="stable")[:5]
    truth = ds.label_matrix("test")
    topk = np.tile(order, (truth.shape[0], 1)).astype(np.int64)
    scores = np.tile(counts[order].astype(np.float32), (truth.shape[0], 1))
    filters = ds.filter_pairs()
    if len(filters):
        topk, _ = filter_predictions(topk, scores, filters)
    return round(100 * float(xmc_metrics(topk, truth, k=1)["P"][0]), 2)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,200 training items, 5 epochs (within 2 minutes)")
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    work = args.out or tempfile.mkdtemp(prefix="vixml-bench-fusion-")
    num_train, epochs = SIZES["quick" if args.quick else "full"]
    cfg = bench_config(os.path.join(work, "runs"), os.path.join(work, "cache"), num_train, epochs)
    try:
        init_ray_for(cfg)
        cfg = ensure_dataset(replace(cfg, **{"model.use_images": True}))  # generate + embed the images once
        ray.shutdown()  # the trainings below run in this process and want both cores
        dataset = cfg.data.dataset
        shuffled = shuffled_copy(dataset, os.path.join(work, "shuffled-dataset"))
        variants = {
            "text_only": {"model.use_images": False, "data.dataset": dataset},
            "text_image": {"model.use_images": True, "data.dataset": dataset},
            "shuffled_image": {"model.use_images": True, "data.dataset": shuffled},
        }
        result: dict = {"num_train": num_train, "epochs": epochs}
        for name, changes in variants.items():
            begin = time.perf_counter()
            summary = train(replace(cfg, **changes), run_dir=os.path.join(work, "runs", name), resume=False)
            result[f"{name}_p1"] = round(float(summary["test_P@1"]), 2)  # the loop reports percent
            result[f"{name}_train_s"] = round(time.perf_counter() - begin, 1)
            print(json.dumps({"variant": name, "P@1": result[f"{name}_p1"], "train_s": result[f"{name}_train_s"]}),
                  flush=True)
        result["popularity_p1"] = popularity_p1(dataset)
        result["seconds"] = round(time.perf_counter() - start, 1)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
