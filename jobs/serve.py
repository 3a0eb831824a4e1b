"""``python jobs/serve.py ...`` = ``vixml-ray serve ...`` (defined in vixml_ray/cli.py)."""
from vixml_ray.cli import job_main

if __name__ == "__main__":
    job_main("serve")
