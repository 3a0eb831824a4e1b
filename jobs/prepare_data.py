"""``python jobs/prepare_data.py ...`` = ``vixml-ray prepare_data ...`` (defined in vixml_ray/cli.py)."""
from vixml_ray.cli import job_main

if __name__ == "__main__":
    job_main("prepare_data")
