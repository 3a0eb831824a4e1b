"""Embeds a prepared dataset's images with a frozen vision tower into its feature cache (Ray Data job).

    python jobs/embed_images.py --dataset DIR [--config FILE] [key=value ...]
    python jobs/embed_images.py --dataset DIR --import-vixml RELEASE_DIR   # ViXML's released arrays / img_urls

Resumable: a re-run embeds only the shards the cache lacks. Prints progress, then a one-line JSON summary (images,
failures by reason, images/s, output directory).
"""

from __future__ import annotations

import argparse
import json
import logging

from vixml_ray.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="prepared dataset directory (local path or URI)")
    parser.add_argument("--config", default=None, help="YAML preset (path or name in vixml_ray/presets)")
    parser.add_argument("--import-vixml", metavar="DIR", default=None,
                        help="import ViXML's released image arrays and/or img_urls.parquet from DIR instead")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. vision.batch_size=128")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)

    if args.import_vixml:
        from vixml_ray.vision.vixml_import import import_vixml

        summary = import_vixml(args.dataset, args.import_vixml, cfg)
    else:
        from vixml_ray.vision.pipeline import embed_images

        summary = embed_images(cfg, args.dataset, progress=not args.no_progress)
    print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
