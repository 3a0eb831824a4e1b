"""refresh_labels: embed a dataset's labels with a trained export into a new index version and make it current.

    python jobs/refresh_labels.py --checkpoint EXPORT_DIR --dataset DIR --out INDEX_DIR [--incremental]
                                  [--config FILE] [key=value ...]

The config defaults to the export's own (``--config`` replaces it; model, prompt and vision tower must stay the
export's). ``--incremental`` re-embeds only labels whose text or image features changed since the current version
(same export) and carries the others over. ``infer.raa.enabled=true`` also embeds every training query into the same
version (the memory of retrieval-augmented inference; carried over the same way). Prints one JSON line: labels,
embedded, carried, labels_per_s, queries, version, out.
"""

from __future__ import annotations

import argparse
import json
import logging

from vixml_ray.index.refresh import refresh_labels
from vixml_ray.inference.export import job_config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="inference export directory of a training run")
    parser.add_argument("--dataset", required=True, help="prepared dataset directory (local path or URI)")
    parser.add_argument("--out", required=True, help="index directory (local path or URI)")
    parser.add_argument("--incremental", action="store_true", help="re-embed only new or changed labels")
    parser.add_argument("--config", help="preset name or YAML file (default: the export's config)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. infer.max_actors=4")
    args = parser.parse_args(argv)
    cfg = job_config(args.checkpoint, args.config, args.overrides)
    summary = refresh_labels(args.checkpoint, args.dataset, args.out, cfg, incremental=args.incremental)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
