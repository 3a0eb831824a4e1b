"""The torch devices and dtypes that configs name (``*.num_gpus_per_actor``, ``model.dtype``, ``vision.dtype``)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def actor_device(num_gpus: float, key: str) -> torch.device:
    """CUDA when the actor or process was given GPUs (``num_gpus``, the config value ``key``, > 0; an error naming
    ``key`` when this process sees no CUDA device), else CPU."""
    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(f"{key} > 0 but this process sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")
