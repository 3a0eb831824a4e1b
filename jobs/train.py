"""train: fine-tune the ViXML embedder on Ray Train (DDP or DeepSpeed ZeRO-2/3).

    python jobs/train.py --config tiny [--run-name NAME] [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config tiny

Starts a private local Ray on 127.0.0.1 unless RAY_ADDRESS (or ray.address) names a cluster. Running the same
config and run name again resumes from the newest checkpoint. Last line: JSON with the inference export's path
(``checkpoint``), first/final loss, samples/s and the validation/test metrics.
"""

from __future__ import annotations

from vixml_ray.cli import job_parser, load_job_config, run_job


def main() -> dict:
    parser = job_parser(__doc__)
    parser.add_argument("--run-name", default="train", help="Ray Train run name (same name = resume)")
    args = parser.parse_args()
    cfg = load_job_config(args)
    from vixml_ray.pipeline import run_training

    return run_training(cfg, run_name=args.run_name)


if __name__ == "__main__":
    run_job(main)
