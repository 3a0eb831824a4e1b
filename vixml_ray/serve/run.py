"""Starting and stopping the service on an initialised Ray (the demo, tests), and serving until interrupted (the
``serve`` job)."""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import ray
from ray import serve

from vixml_ray.config import Config
from vixml_ray.ray_utils import init_ray_for

APP_NAME = "vixml"


def start(cfg: Config, app: serve.Application, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Starts Serve's HTTP proxy on ``serve.host:serve.port`` (if not yet running), deploys ``app`` and waits until
    it is healthy; returns its base URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=name, route_prefix=route_prefix)
    return f"http://{cfg.serve.host}:{cfg.serve.port}{route_prefix.rstrip('/')}"


def stop() -> None:
    """Deletes every application and stops Serve (its proxy and controller)."""
    serve.shutdown()


def serve_until_stopped(cfg: Config, checkpoint: str, index_dir: str,
                        stop_event: threading.Event | None = None) -> dict[str, Any]:
    """Starts (or joins) Ray, deploys the app on ``checkpoint`` and ``index_dir``, prints ``{"url": ..., "docs":
    ...}`` once it answers, and serves until ``stop_event`` is set (in the main thread also by SIGINT/SIGTERM); then
    deletes the application, stops Serve and Ray."""
    from vixml_ray.serve.app import application

    stop_event = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_event.set())
    init_ray_for(cfg)
    try:
        url = start(cfg, application(checkpoint, index_dir, cfg))
        print(json.dumps({"url": url, "docs": f"{url}/docs"}), flush=True)
        stop_event.wait()
    finally:
        stop()
        ray.shutdown()
    return {"url": url, "stopped": True}
