"""``python jobs/embed_images.py ...`` = ``vixml-ray embed_images ...`` (defined in vixml_ray/cli.py)."""
from vixml_ray.cli import job_main

if __name__ == "__main__":
    job_main("embed_images")
