"""Retrieval quality of the PRIME additions on a real dataset: the plain Siamese embedder, + label prototypes, and
+ prototypes with retrieval-augmented inference, each trained within the same budget of M minutes, over N seeds.

Every configuration runs the production path: Ray Train (``vixml_ray.train.ray_train.fit``) with
``train.max_minutes = M``, which bounds the whole training side, everything a variant does before its test (the
prototypes' label clustering, the query clustering and centroid passes, the steps, validations, checkpoints and the
final centroid pass; see :mod:`vixml_ray.train.loop`). A preset whose ``train.epochs`` fit the budget keeps its full
LR schedule. Then ``refresh_labels`` into a versioned label index (prototype vectors when the model has them; with
retrieval augmentation the version also holds the training queries' embeddings), then ``evaluate`` (sharded FAISS
top-100, filter pairs removed, pyxclib metrics). ``prototypes_raa`` is the ``prototypes`` model evaluated with
``infer.raa.enabled`` against the same index version. Each variant trains ``--seeds`` times, with ``train.seed`` =
the config's seed + 0, 1, ...; every run prints its own JSON line.
``classifiers`` adds per-label classifier vectors to the plain model (``model.classifiers``: Siamese epochs, then the
frozen-encoder classifier stage within the same budget), ``classifiers_raa`` evaluates it with retrieval
augmentation, ``prototypes_classifiers`` (+ ``_raa``) trains the encoder with prototypes before the
classifier stage (the vectors then fuse with the prototypes, ``model.classifiers.fusion``), ``classifiers_joint``
(+ ``_raa``) runs the stage on the pretrained encoder first and then trains the encoder and the vectors together
(``train.classifier_loss.joint``), and ``classifiers_pretrained`` (+ ``classifiers_pretrained_raa``) runs the
classifier stage alone on the pretrained encoder (``train.epochs=0``): the time-to-quality variant.
``classifiers_joint_lexical`` (+ ``_raa``) is ``classifiers_joint`` with the sparse lexical head
(``model.lexical``: per-label TF-IDF classifiers fitted after the last epoch, inside ``train_side_s``, re-ranking
the index's candidates). ``--variants`` trains only some.

    python bench/quality.py --dataset DIR --preset FILE [--minutes M] [--seeds N] [--variants V ...] [--out DIR]
                            [key=value ...]

e.g. ``python bench/quality.py --dataset /tmp/cooking --preset minilm-cpu --minutes 10 --seeds 3`` (prepare the
dataset with ``jobs/prepare_data.py`` first; a nameless catalogue, whose labels' text is their uid, with
``jobs/prepare_data.py --source DIR --out DIR data.label_text=uid``). Last line: JSON ``{"plain": {...},
"prototypes": {...}, "prototypes_raa": {...}, ...}``, each with the MEAN over seeds of ``P@1``, ``P@5``,
``nDCG@5``, ``PSP@5`` (percent, test split), ``train_side_s`` (the loop's training-side seconds: what the budget
bounds), ``train_s`` (the wall time of ``fit``, Ray start-up, data loading, test and export included), ``steps``
and ``epochs``, the sample standard deviation of each as ``<key>_std`` (0 for one seed), and ``seeds``; beside
them the dataset, its ``label_text`` (``text`` or ``uid``), ``minutes`` and the bench's ``seconds``.
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
from vixml_ray.data import open_dataset  # noqa: E402
from vixml_ray.eval.evaluate import evaluate  # noqa: E402
from vixml_ray.index.refresh import refresh_labels  # noqa: E402
from vixml_ray.ray_utils import init_ray_for  # noqa: E402
from vixml_ray.train.ray_train import fit  # noqa: E402

SHOWN = ("P@1", "P@5", "nDCG@5", "PSP@5")
PER_RUN = ("train_side_s", "train_s", "steps", "epochs")


def percent(summary: dict) -> dict[str, float]:
    return {key: round(100 * float(summary[key]), 2) for key in SHOWN}


def run_variant(cfg: Config, name: str, work: str, raa_too: bool) -> dict[str, dict]:
    """Trains ``cfg`` as run ``{name}-seed{train.seed}``, refreshes its label index and evaluates it (also with
    retrieval augmentation when ``raa_too``); returns ``{name: metrics}`` (and ``{name}_raa``)."""
    run = f"{name}-seed{cfg.train.seed}"
    shutil.rmtree(os.path.join(work, run), ignore_errors=True)  # a fresh run, not a resumed one
    start = time.perf_counter()
    summary = fit(cfg, run_name=run)
    cost = {"train_side_s": summary["train_side_s"], "train_s": round(time.perf_counter() - start, 1),
            "steps": summary["steps"], "epochs": summary["epochs"]}
    export = summary["checkpoint"]
    index_dir = os.path.join(work, run, "label-index")
    raa = replace(cfg, **{"infer.raa.enabled": True})
    refresh_labels(export, cfg.data.dataset, index_dir, raa if raa_too else cfg)
    results = {name: {**percent(evaluate(export, cfg.data.dataset, os.path.join(work, run, "eval"),
                                         index_dir=index_dir, cfg=cfg, overwrite=True)), **cost}}
    if raa_too:
        metrics = evaluate(export, cfg.data.dataset, os.path.join(work, run, "eval-raa"), index_dir=index_dir,
                           cfg=raa, overwrite=True)
        results[f"{name}_raa"] = {**percent(metrics), **cost}
    return results


def aggregate(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every figure over the runs of one variant, and its sample standard deviation as ``<key>_std``."""
    out: dict[str, float] = {}
    for key in (*SHOWN, *PER_RUN):
        values = np.asarray([run[key] for run in runs], dtype=np.float64)
        out[key] = round(float(values.mean()), 2)
        out[f"{key}_std"] = round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 2)
    return out


VARIANTS = ("plain", "prototypes", "classifiers", "prototypes_classifiers", "classifiers_joint",
            "classifiers_joint_lexical", "classifiers_pretrained")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a prepared dataset directory (jobs/prepare_data.py)")
    parser.add_argument("--preset", required=True, help="training preset name or YAML file (e.g. minilm-cpu)")
    parser.add_argument("--minutes", type=float, default=20.0, help="training-side budget per run")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="models to train (each with RAA too where it says so in the module doc)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant (train.seed + 0, 1, ...)")
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every configuration")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    dataset = os.path.abspath(args.dataset)
    label_text = open_dataset(dataset).manifest.get("label_text", "text")
    work = os.path.abspath(args.out or tempfile.mkdtemp(prefix="vixml-bench-quality-"))
    cfg = load_config(args.preset, [*args.overrides, f"data.dataset={dataset}", f"out_dir={work}",
                                    f"train.max_minutes={args.minutes}"])
    seeds = [cfg.train.seed + i for i in range(args.seeds)]
    classifiers = {"model.prototypes.enabled": False, "model.classifiers.enabled": True}
    variants = {"plain": ({"model.prototypes.enabled": False}, False),
                "prototypes": ({"model.prototypes.enabled": True}, True),
                "classifiers": (classifiers, True),
                "prototypes_classifiers": ({**classifiers, "model.prototypes.enabled": True}, True),
                "classifiers_joint": ({**classifiers, "train.classifier_loss.joint": True}, True),
                "classifiers_joint_lexical": ({**classifiers, "train.classifier_loss.joint": True,
                                               "model.lexical.enabled": True}, True),
                "classifiers_pretrained": ({**classifiers, "train.epochs": 0}, True)}
    variants = {name: variants[name] for name in args.variants}
    runs: dict[str, list[dict[str, float]]] = {}
    started = time.perf_counter()
    try:
        init_ray_for(cfg)
        for seed in seeds:  # seed-major: a drift of the shared machine's load spreads over every variant alike
            for name, (changes, raa_too) in variants.items():
                variant_cfg = replace(cfg, **changes, **{"train.seed": seed})
                for variant, value in run_variant(variant_cfg, name, work, raa_too).items():
                    runs.setdefault(variant, []).append(value)
                    print(json.dumps({"variant": variant, "seed": seed, **value}), flush=True)
        result: dict = {name: {**aggregate(values), "seeds": seeds} for name, values in runs.items()}
        result.update({"dataset": dataset, "label_text": label_text, "minutes": args.minutes,
                       "seconds": round(time.perf_counter() - started, 1)})
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
