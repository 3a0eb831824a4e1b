"""fp32 vs bf16 autocast (``model.compute_dtype``) in the real training step on CPU: samples/s and losses.

Two engines start from the same seeded weights of the preset's model and take the same real global batches of a
prepared dataset through the production step (:func:`~vixml_ray.train.step.make_step_batch` +
:func:`~vixml_ray.train.step.train_step`: forward, all-gather, loss, backward, AdamW), alternating step by step so
that a drift of the machine's load hits both alike; step 0 of each is warm-up. Prints one JSON line per step and a
last one with each side's median samples/s (wall and CPU), the ratios bf16 / fp32, the per-step losses of both
(they should agree to ~3 decimals) and whether this CPU runs bf16 natively (:func:`vixml_ray.devices.native_bf16`).

    python bench/precision.py --dataset DIR [--preset minilm-cpu] [--steps 6] [--threads 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vixml_ray.config import load_config, replace  # noqa: E402
from vixml_ray.devices import native_bf16  # noqa: E402
from vixml_ray.model import build_embedder, load_tokenizer  # noqa: E402
from vixml_ray.train.engine import TorchEngine  # noqa: E402
from vixml_ray.train.inputs import load_inputs  # noqa: E402
from vixml_ray.train.loss import TripletLossConfig  # noqa: E402
from vixml_ray.train.positives import PositiveSampler  # noqa: E402
from vixml_ray.train.sampler import GlobalBatchSampler  # noqa: E402
from vixml_ray.train.step import make_step_batch, train_step  # noqa: E402

SIDES = ("float32", "bfloat16")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a prepared dataset directory (jobs/prepare_data.py)")
    parser.add_argument("--preset", default="minilm-cpu")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per side (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(args.preset, [*args.overrides, f"data.dataset={os.path.abspath(args.dataset)}"])
    inputs = load_inputs(base, load_tokenizer(base.model, base.cache_dir))
    engines = {}
    for side in SIDES:
        cfg = replace(base, **{"model.compute_dtype": side})
        torch.manual_seed(base.train.seed)
        engines[side] = TorchEngine(build_embedder(cfg, inputs.image_dim), cfg.train, 10 * (args.steps + 1),
                                    torch.device("cpu"))
    positives = PositiveSampler(inputs.train_labels, base.train.seed)
    sampler = GlobalBatchSampler(np.intersect1d(inputs.train_rows, positives.rows_with_labels()),
                                 base.train.batch_size, base.train.seed)
    batches, sampled = sampler.epoch_batches(0), positives.sample(0)
    if len(batches) < args.steps + 1:
        parser.error(f"the dataset has {len(batches)} batches of {base.train.batch_size}; --steps needs "
                     f"{args.steps + 1}")
    loss_cfg = TripletLossConfig.from_train(base.train)
    record = {side: {"s": [], "cpu_s": [], "loss": [], "queries": 0} for side in SIDES}
    for index in range(args.steps + 1):
        batch = make_step_batch(batches[index], sampled, inputs.train_labels, inputs.tokens["train"],
                                inputs.tokens["label"], inputs.images, base.train.embed_chunk_rows,
                                torch.device("cpu"))
        for side in SIDES if index % 2 == 0 else SIDES[::-1]:
            cpu, wall = time.process_time(), time.perf_counter()
            loss, _ = train_step(engines[side], batch, loss_cfg)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rec = record[side]
            rec["loss"].append(round(loss, 4))
            if index > 0:
                rec["s"].append(wall / batch.num_queries)
                rec["cpu_s"].append(cpu / batch.num_queries)
            print(json.dumps({"step": index, "compute_dtype": side, "s": round(wall, 2), "cpu_s": round(cpu, 2),
                              "loss": round(loss, 4), "queries": batch.num_queries,
                              "load1": round(os.getloadavg()[0], 2)}), flush=True)
    result: dict = {side: {"samples_per_s": round(1 / float(np.median(rec["s"])), 1),
                           "samples_per_cpu_s": round(1 / float(np.median(rec["cpu_s"])), 1),
                           "losses": rec["loss"]} for side, rec in record.items()}
    result.update({
        "ratio": round(result["bfloat16"]["samples_per_s"] / result["float32"]["samples_per_s"], 2),
        "cpu_ratio": round(result["bfloat16"]["samples_per_cpu_s"] / result["float32"]["samples_per_cpu_s"], 2),
        "native_bf16": native_bf16("cpu"), "threads": args.threads, "batch_size": base.train.batch_size,
        "steps": args.steps, "dataset": os.path.abspath(args.dataset),
    })
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
