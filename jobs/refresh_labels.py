"""``python jobs/refresh_labels.py ...`` = ``vixml-ray refresh_labels ...`` (defined in vixml_ray/cli.py)."""
from vixml_ray.cli import job_main

if __name__ == "__main__":
    job_main("refresh_labels")
