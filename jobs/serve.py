"""serve: the online scoring service (Ray Serve) over a label index, until interrupted.

    python jobs/serve.py --checkpoint EXPORT_DIR --index INDEX_DIR [--port 8000] [--config FILE] [key=value ...]

Starts a private local Ray on 127.0.0.1 (or joins RAY_ADDRESS), deploys vixml_ray.serve.app (FastAPI ingress,
batched query encoder, one deployment per index shard), prints {"url": ...} as a JSON line once it answers, and
serves until Ctrl-C or SIGTERM; then it deletes the application and stops Serve. The service follows the index's
CURRENT version (serve.poll_interval_s). Settings: the serve.* section of the config (vixml_ray/config.py), e.g.
serve.shard_replicas=2 serve.api_key_env=VIXML_API_KEY. The same app runs under the Serve CLI:
``serve run vixml_ray.serve.app:build checkpoint=EXPORT_DIR index=INDEX_DIR``.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import ray

from vixml_ray.cli import job_parser, run_job
from vixml_ray.inference.export import job_config
from vixml_ray.ray_utils import init_ray_for
from vixml_ray.serve.app import application
from vixml_ray.serve.run import start, stop


def main(argv: list[str] | None = None, stop_event: threading.Event | None = None) -> dict[str, Any]:
    parser = job_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="inference export directory of a training run")
    parser.add_argument("--index", required=True, help="index directory written by refresh_labels")
    parser.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    args = parser.parse_args(argv)
    cfg = job_config(args.checkpoint, args.config, [*args.overrides, *([f"serve.port={args.port}"] if args.port
                                                                      else [])])
    stop_event = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_event.set())
    init_ray_for(cfg)
    try:
        url = start(cfg, application(args.checkpoint, args.index, cfg))
        print(json.dumps({"url": url, "docs": f"{url}/docs"}), flush=True)
        stop_event.wait()
    finally:
        stop()
        ray.shutdown()
    return {"url": url, "stopped": True}


if __name__ == "__main__":
    run_job(main)
