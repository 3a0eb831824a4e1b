"""The frozen image tower behind one interface, whichever backend ``VisionConfig.backend`` names.

* :func:`load_preprocessor` (cheap, no weights): the backend's own preprocessing as a picklable callable
  ``list[PIL RGB image] -> dict[str, ndarray]``, run by the CPU decode tasks;
* :func:`load_tower` (loads the weights once): ``embed(inputs) -> float32 [B, D]`` pooled image embeddings, run by
  the embedding actors; bf16 on GPU and fp32 on CPU unless ``VisionConfig.dtype`` says otherwise.

Random-init towers (``weights=None``) are seeded, so every actor and every re-run builds the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from PIL import Image

from vixml_ray.config import VisionConfig
from vixml_ray.devices import DTYPES, actor_device
from vixml_ray.errors import ConfigError
from vixml_ray.vision import hf_backend, openclip_backend

RANDOM_INIT_SEED = 0


class Preprocessor(Protocol):
    input_names: tuple[str, ...]
    image_size: int

    def __call__(self, images: list[Image.Image]) -> dict[str, np.ndarray]: ...


def load_preprocessor(v: VisionConfig) -> Preprocessor:
    if v.backend == "open_clip":
        return openclip_backend.OpenClipPreprocessor(openclip_backend.preprocess_config(v))
    return hf_backend.preprocessor(v)


def resolve_dtype(v: VisionConfig, device: torch.device) -> torch.dtype:
    if v.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and v.dtype == "float16":
        raise ConfigError("invalid value for 'vision.dtype': float16 is not a CPU dtype; use float32 or bfloat16")
    return DTYPES[v.dtype]


class Tower:
    """A loaded, frozen image tower: ``embed`` maps preprocessed inputs to float32 pooled embeddings."""

    def __init__(self, module: torch.nn.Module, dim: int, run: Callable[[torch.nn.Module, dict], torch.Tensor],
                 device: torch.device, dtype: torch.dtype):
        self.module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self._run = run

    def embed(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = {}
        for name, array in inputs.items():
            t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
            tensors[name] = t.to(self.dtype) if t.is_floating_point() else t
        with torch.inference_mode():
            out = self._run(self.module, tensors)
        return out.float().cpu().numpy()


def load_tower(v: VisionConfig, device: Optional[torch.device] = None) -> Tower:
    """Builds or loads the tower named by ``v`` on ``device`` (default: CUDA when the actor was given GPUs, else
    CPU)."""
    device = device or actor_device(v.num_gpus_per_actor, "vision.num_gpus_per_actor")
    dtype = resolve_dtype(v, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if v.backend == "open_clip":
            module, dim = openclip_backend.load_visual(v)
            return Tower(module, dim, openclip_backend.forward, device, dtype)
        module, dim = hf_backend.load_vision_model(v)
    trained_size = getattr(module.config, "image_size", None)
    interpolate = v.image_size is not None and v.image_size != trained_size
    return Tower(module, dim, lambda m, x: hf_backend.forward(m, x, interpolate), device, dtype)


# ------------------------------------------------------------------------------------------------------ identity
def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def feature_slug(v: VisionConfig) -> str:
    """The feature cache's folder name: ``vision.slug``, else model name, weights and image size, e.g.
    ``ViT-SO400M-16-SigLIP2-384.webli`` or ``google-siglip2-so400m-patch14-384``."""
    if v.slug:
        return _clean(v.slug)
    if v.weights is None:
        weights = "random"
    elif "://" in v.weights or os.path.exists(v.weights):
        weights = os.path.splitext(os.path.basename(v.weights.rstrip("/")))[0]
    else:
        weights = v.weights.removeprefix("hf-hub:")
    parts = [v.model_name] if weights == v.model_name else [v.model_name, weights]
    slug = ".".join(_clean(p) for p in parts)
    return f"{slug}-{v.image_size}px" if v.image_size else slug


def model_fingerprint(v: VisionConfig) -> str:
    """A digest of every setting that changes the embeddings (a cache shard made otherwise is recomputed)."""
    keys = ("backend", "model_name", "weights", "model_config", "image_size", "dtype", "cache_dtype")
    settings = {k: getattr(v, k) for k in keys}
    settings["gpu"] = v.num_gpus_per_actor > 0  # dtype "auto" means bf16 there
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def model_info(v: VisionConfig, dim: int) -> dict[str, Any]:
    """What the cache manifest and the dataset manifest record about the model."""
    return {"backend": v.backend, "model_name": v.model_name, "weights": v.weights, "image_size": v.image_size,
            "dim": int(dim), "dtype": v.cache_dtype, "fingerprint": model_fingerprint(v)}
