"""Writes the DeepSpeed JSON examples in ``cluster/deepspeed/`` from the paper presets.

They come from the function training itself calls (``vixml_ray.train.deepspeed_config.deepspeed_config``) with each
preset's own world size (``train.num_workers``), so they show exactly what a run of that preset hands to
``deepspeed.initialize``; a test fails when a committed file no longer matches.

    python cluster/make_deepspeed_examples.py           # (re)write the files
    python cluster/make_deepspeed_examples.py --check   # exit 1, naming the stale files, if any differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vixml_ray.config import load_config
from vixml_ray.train.deepspeed_config import deepspeed_config

OUT_DIR = Path(__file__).resolve().parent / "deepspeed"

# file name -> (preset, overrides)
EXAMPLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "zero2-lf-amazontitles-131k-qwen2.5-3b.json": ("lf-amazontitles-131k-qwen2.5-3b", ()),
    "zero3-lf-amazontitles-131k-qwen2.5-7b.json": ("lf-amazontitles-131k-qwen2.5-7b", ()),
    "zero3-offload-lf-amazontitles-1.3m-qwen2.5-7b.json": (
        "lf-amazontitles-1.3m-qwen2.5-7b", ("train.offload_optimizer=true",)),
}


def render() -> dict[str, str]:
    """File name -> JSON text of every example."""
    out = {}
    for name, (preset, overrides) in EXAMPLES.items():
        cfg = load_config(preset, list(overrides))
        out[name] = json.dumps(deepspeed_config(cfg, cfg.train.num_workers), indent=2, sort_keys=True) + "\n"
    return out


def stale(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of the examples whose file in ``out_dir`` is missing or differs from :func:`render`."""
    return [name for name, text in render().items()
            if not (out_dir / name).is_file() or (out_dir / name).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        print(json.dumps({"stale": names}))
        return 1 if names else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT_DIR / name).write_text(text)
    print(json.dumps({"written": sorted(EXAMPLES), "dir": str(OUT_DIR)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
