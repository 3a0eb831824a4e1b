"""Starting or joining Ray the same way in every job and test."""

from __future__ import annotations

import os
from typing import Any

import ray

from vixml_ray.config import Config


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    local_only: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Joins the cluster at ``address`` (or ``RAY_ADDRESS``), else starts a private local Ray on 127.0.0.1.

    A private local Ray never attaches to a stray instance on the machine (``address="local"``).
    ``local_only=True`` ignores ``RAY_ADDRESS`` (tests).
    """
    if ray.is_initialized():
        return {}
    address = address or (None if local_only else os.environ.get("RAY_ADDRESS"))
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "DS_",
                                                                             "TORCH_EXTENSIONS", "RAY_DATA_"))}}
    if address:
        return ray.init(address=address, runtime_env=env, **kwargs).address_info
    return ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=object_store_memory,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env=env,
        **kwargs,
    ).address_info


def init_ray_for(cfg: Config) -> dict[str, Any]:
    """:func:`init_ray` with the job config's ``ray`` section (what every job entry point calls)."""
    return init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.object_store_memory)
