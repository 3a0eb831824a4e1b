"""Retrieval quality of the PRIME additions on a real dataset: the plain Siamese embedder, + label prototypes, and
+ prototypes with retrieval-augmented inference, each trained within the same budget of M minutes.

Every configuration runs the production path: Ray Train (``vixml_ray.train.ray_train.fit``) with
``train.max_minutes = M`` (the loop stops at the budget after the step that reaches it, then validates, tests and
exports; a preset whose ``train.epochs`` fit the budget keeps its full LR schedule), then ``refresh_labels`` into a
versioned label index (prototype vectors when the model has them; with retrieval augmentation the version also holds
the training queries' embeddings), then ``evaluate`` (sharded FAISS top-100, filter pairs removed, pyxclib metrics).
``prototypes_raa`` is the ``prototypes`` model evaluated with ``infer.raa.enabled`` against the same index version.
``classifiers`` adds per-label classifier vectors to the plain model (``model.classifiers``: Siamese epochs, then the
frozen-encoder classifier stage within the same budget), ``classifiers_raa`` evaluates it with retrieval
augmentation, and ``classifiers_pretrained`` runs the classifier stage alone on the pretrained encoder
(``train.epochs=0``): the time-to-quality variant.

    python bench/quality.py --dataset DIR --preset FILE [--minutes M] [--out DIR] [key=value ...]

e.g. ``python bench/quality.py --dataset /tmp/cooking --preset minilm-cpu --minutes 20`` (prepare the dataset with
``jobs/prepare_data.py`` first). Last line: JSON ``{"plain": {...}, "prototypes": {...}, "prototypes_raa": {...},
"classifiers": {...}, ...}``, each with ``P@1``, ``P@5``, ``nDCG@5``, ``PSP@5`` (percent, test split) and ``train_s``.
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

import ray  # noqa: E402

from vixml_ray.config import Config, load_config, replace  # noqa: E402
from vixml_ray.eval.evaluate import evaluate  # noqa: E402
from vixml_ray.index.refresh import refresh_labels  # noqa: E402
from vixml_ray.ray_utils import init_ray  # noqa: E402
from vixml_ray.train.ray_train import fit  # noqa: E402

SHOWN = ("P@1", "P@5", "nDCG@5", "PSP@5")


def percent(summary: dict) -> dict[str, float]:
    return {key: round(100 * float(summary[key]), 2) for key in SHOWN}


def run_variant(cfg: Config, name: str, work: str, raa_too: bool) -> dict[str, dict]:
    """Trains ``cfg`` as run ``name``, refreshes its label index and evaluates it (also with retrieval augmentation
    when ``raa_too``); returns ``{name: metrics}`` (and ``{name}_raa``)."""
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)  # a fresh run, not a resumed one
    start = time.perf_counter()
    summary = fit(cfg, run_name=name)
    train_s = round(time.perf_counter() - start, 1)
    export = summary["checkpoint"]
    index_dir = os.path.join(work, name, "label-index")
    raa = replace(cfg, **{"infer.raa.enabled": True})
    refresh_labels(export, cfg.data.dataset, index_dir, raa if raa_too else cfg)
    results = {name: {**percent(evaluate(export, cfg.data.dataset, os.path.join(work, name, "eval"),
                                         index_dir=index_dir, cfg=cfg, overwrite=True)),
                      "train_s": train_s, "epochs": summary["epochs"], "steps": summary["steps"]}}
    if raa_too:
        metrics = evaluate(export, cfg.data.dataset, os.path.join(work, name, "eval-raa"), index_dir=index_dir,
                           cfg=raa, overwrite=True)
        results[f"{name}_raa"] = {**percent(metrics), "train_s": train_s}
    for key, value in results.items():
        print(json.dumps({"variant": key, **value}), flush=True)
    return results


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a prepared dataset directory (jobs/prepare_data.py)")
    parser.add_argument("--preset", required=True, help="training preset name or YAML file (e.g. minilm-cpu)")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per configuration")
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every configuration")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = os.path.abspath(args.out or tempfile.mkdtemp(prefix="vixml-bench-quality-"))
    cfg = load_config(args.preset, [*args.overrides, f"data.dataset={os.path.abspath(args.dataset)}",
                                    f"out_dir={work}", f"train.max_minutes={args.minutes}"])
    started = time.perf_counter()
    try:
        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.object_store_memory)
        result = run_variant(replace(cfg, **{"model.prototypes.enabled": False}), "plain", work, raa_too=False)
        result.update(run_variant(replace(cfg, **{"model.prototypes.enabled": True}), "prototypes", work,
                                  raa_too=True))
        classifiers = {"model.prototypes.enabled": False, "model.classifiers.enabled": True}
        result.update(run_variant(replace(cfg, **classifiers), "classifiers", work, raa_too=True))
        result.update(run_variant(replace(cfg, **classifiers, **{"train.epochs": 0}), "classifiers_pretrained", work,
                                  raa_too=False))
        result["minutes"] = args.minutes
        result["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
