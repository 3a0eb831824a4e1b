"""predict: the online predictor over a JSONL file of raw queries (text + images).

    python jobs/predict.py --checkpoint EXPORT_DIR --index INDEX_DIR --queries FILE.jsonl --out FILE.jsonl
                           [--k 10] [--overwrite] [--config FILE] [key=value ...]

Each input line is ``{"id": ..., "text": "...", "images": ["path, URI or URL", {"b64": "..."}]}``; each output line
holds the top-k label ids, names and scores and the index version that answered (see vixml_ray.predict.jsonl). Bad
lines get an error record and are counted. ``infer.raa.enabled=true`` scores retrieval-augmented, as evaluate does
(the index must hold the training queries). Prints one JSON line: queries, predicted, skipped, queries_per_s, out.
"""

from __future__ import annotations

import argparse
import json
import logging

from vixml_ray.inference.export import job_config
from vixml_ray.predict.jsonl import predict_file


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="inference export directory of a training run")
    parser.add_argument("--index", required=True, help="index directory written by refresh_labels")
    parser.add_argument("--queries", required=True, help="JSONL file of queries (local path or URI)")
    parser.add_argument("--out", required=True, help="JSONL file of predictions (local path or URI)")
    parser.add_argument("--k", type=int, default=10, help="labels per query (default 10)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--config", help="preset name or YAML file (default: the export's config)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. index.num_shards=4")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    cfg = job_config(args.checkpoint, args.config, args.overrides)
    summary = predict_file(args.checkpoint, args.index, args.queries, args.out, k=args.k, cfg=cfg,
                           overwrite=args.overwrite)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
