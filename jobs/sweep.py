"""sweep: Ray Tune over training choices (prompt template, image position, #images, LoRA, learning rates, margin,
cluster curriculum) with ASHA on the validation metric; every trial is a Ray Train run.

    python jobs/sweep.py --config sweep-tiny [key=value ...]
    python jobs/sweep.py --config tiny tune.presets=[prompt] tune.name=prompts train.num_workers=1

Starts a private local Ray on 127.0.0.1 unless RAY_ADDRESS (or ray.address) names a cluster. Running the same command
again resumes an interrupted sweep (Tuner.restore) without rerunning finished trials. Writes
<ray.storage_path or out_dir>/<tune.name>/report/: results.csv, results.md, trials.png and best.yaml (the best trial's
full config, for jobs/train.py). Last line: JSON with trials, early_stopped, best_metric, best_config, ...
"""

from __future__ import annotations

from vixml_ray.cli import job_parser, load_job_config, run_job


def main() -> dict:
    cfg = load_job_config(job_parser(__doc__).parse_args())
    from vixml_ray.tune.sweep import run_sweep

    return run_sweep(cfg)


if __name__ == "__main__":
    run_job(main)
