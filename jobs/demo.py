"""demo: the whole pipeline end to end on the built-in default (what ``make demo`` runs).

    python jobs/demo.py [--config demo] [key=value ...]

Synthetic multimodal data -> embed_images -> train text-only and text+image -> refresh_labels -> evaluate, on a
private local Ray. Prints a table comparing the two (P@1, P@5, PSP@5, train time) and the path of a PNG with the
same comparison; the last line is JSON: {"text_only": {...}, "text_image": {...}, "plot": PATH} (percent).
"""

from __future__ import annotations

from vixml_ray.cli import job_parser, load_job_config, run_job


def main() -> dict:
    parser = job_parser(__doc__)
    parser.set_defaults(config="demo")
    cfg = load_job_config(parser.parse_args())
    from vixml_ray.demo import run_demo

    return run_demo(cfg)


if __name__ == "__main__":
    run_job(main)
