"""What every job script shares: ``--config`` + dotted overrides, logging, clear errors, the final JSON line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from vixml_ray.config import Config, load_config
from vixml_ray.errors import ConfigError


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="preset name (jobs/configs) or YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=3")
    return parser


def load_job_config(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    return load_config(args.config, [*(extra or []), *args.overrides])


def run_job(main: Callable[[], dict[str, Any]]) -> None:
    """Runs a job's ``main``; prints its summary as the last line (one JSON object); bad input exits 2 with the
    message alone (it names the file, line or key), not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = main()
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, sort_keys=True, default=float))
