"""prepare_data: a raw Extreme Classification Repository folder (or synthetic data) -> a dataset directory.

    python jobs/prepare_data.py --source DIR --out DIR [--config FILE] [--overwrite] [key=value ...]
    python jobs/prepare_data.py --synthetic --out DIR [--format dataset|xc] [--config FILE] [key=value ...]

``--source``/``--out`` default to ``data.source``/``data.dataset`` of the config. Prints one JSON line: counts and
the output path.
"""

from __future__ import annotations

import argparse
import json
import logging

from vixml_ray.config import load_config
from vixml_ray.data import generate_synthetic, prepare_dataset


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="preset name or YAML file")
    parser.add_argument("--source", help="raw XC folder (default: data.source)")
    parser.add_argument("--out", help="output directory or URI (default: data.dataset)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--synthetic", action="store_true", help="generate synthetic data (data.synthetic.*)")
    parser.add_argument("--format", choices=("dataset", "xc"), default="dataset",
                        help="synthetic output: a prepared dataset with images, or raw XC files")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.filters=none")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.data.dataset
    if not out:
        parser.error("no output: pass --out or set data.dataset")
    if args.synthetic:
        summary = generate_synthetic(out, cfg, fmt=args.format, overwrite=args.overwrite)
    else:
        source = args.source or cfg.data.source
        if not source:
            parser.error("no input: pass --source, set data.source, or use --synthetic")
        summary = prepare_dataset(source, out, cfg, overwrite=args.overwrite)
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
