"""``python jobs/refresh_labels.py ...`` is ``vixml-ray refresh_labels ...``: the job is defined in vixml_ray/cli.py (see --help)."""
from vixml_ray.cli import job_main

if __name__ == "__main__":
    job_main("refresh_labels")
