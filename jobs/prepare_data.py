"""``python jobs/prepare_data.py ...`` is ``vixml-ray prepare_data ...``: the job is defined in vixml_ray/cli.py (see --help)."""
from vixml_ray.cli import job_main

if __name__ == "__main__":
    job_main("prepare_data")
