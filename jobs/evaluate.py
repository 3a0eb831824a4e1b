"""evaluate: P@k, nDCG@k, PSP@k, PSnDCG@k and R@k of a trained export on a dataset's test split.

    python jobs/evaluate.py --checkpoint EXPORT_DIR --dataset DIR [--index INDEX_DIR] [--out DIR] [--overwrite]
                            [--config FILE] [key=value ...]

Embeds the test queries (Ray Data), retrieves the top ``eval.topk`` labels from the sharded index (``--index``, or
a fresh label refresh into a temporary index), removes the dataset's filter pairs from the predictions and writes
metrics.json, metrics.md, metrics.png and predictions.parquet to ``--out`` (default ``<out_dir>/eval``). The config
defaults to the export's own. ``infer.raa.enabled=true`` makes the predictions retrieval-augmented (the index must
then hold the training queries: refresh it with the same override). Prints one JSON line: the headline metrics and
the output directory.
"""

from __future__ import annotations

import argparse
import json
import logging

from vixml_ray import storage
from vixml_ray.eval.evaluate import evaluate
from vixml_ray.inference.export import job_config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="inference export directory of a training run")
    parser.add_argument("--dataset", required=True, help="prepared dataset directory (local path or URI)")
    parser.add_argument("--index", help="index directory to query (default: refresh into a temporary one)")
    parser.add_argument("--out", help="output directory (default: <out_dir>/eval)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--config", help="preset name or YAML file (default: the export's config)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.topk=100")
    args = parser.parse_args(argv)
    cfg = job_config(args.checkpoint, args.config, args.overrides)
    out = args.out or storage.join(cfg.out_dir, "eval")
    summary = evaluate(args.checkpoint, args.dataset, out, index_dir=args.index, cfg=cfg, overwrite=args.overwrite)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
