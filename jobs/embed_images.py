"""``python jobs/embed_images.py ...`` is ``vixml-ray embed_images ...``: the job is defined in vixml_ray/cli.py (see --help)."""
from vixml_ray.cli import job_main

if __name__ == "__main__":
    job_main("embed_images")
