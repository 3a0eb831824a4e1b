"""Starting and stopping the service on an initialised Ray (``jobs/serve.py``, the demo, tests)."""

from __future__ import annotations

from ray import serve

from vixml_ray.config import Config

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
