"""The open_clip backend: any open_clip architecture (SigLIP, SigLIP2, CLIP); the image tower's output is the one
pooled vector per image (for SigLIP: the attention-pooling head's output, what ``encode_image`` returns unnormalised).

``VisionConfig.weights`` selects the checkpoint the way open_clip does: ``None`` = random init, a pretrained tag
(``webli``), ``hf-hub:org/repo``, a local directory holding ``open_clip_config.json`` + weights (a downloaded hub
repo, the form that carries its preprocessing), or a local weights file for ``model_name``'s architecture.
``VisionConfig.model_config`` registers a custom architecture under ``model_name`` (open_clip's own model-config
format: ``embed_dim``, ``vision_cfg``, ``text_cfg``), e.g. a tiny tower for tests.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
import torch
from PIL import Image

from vixml_ray.config import VisionConfig
from vixml_ray.errors import ConfigError

STUB_TEXT = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}
_REGISTERED: dict[str, str] = {}  # custom architectures registered in this process: name -> config JSON


def _register(v: VisionConfig) -> None:
    import open_clip

    if v.model_config is None:
        return
    text = json.dumps(v.model_config, sort_keys=True)
    if _REGISTERED.get(v.model_name) == text:
        return
    if v.model_name not in _REGISTERED and v.model_name in open_clip.list_models():
        raise ConfigError(f"vision.model_config: '{v.model_name}' is a built-in open_clip model; give the custom "
                          "architecture a new vision.model_name")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in v.model_config]
    if missing:
        raise ConfigError(f"vision.model_config for open_clip lacks {missing} (open_clip's model-config format)")
    path = os.path.join(tempfile.mkdtemp(prefix="vixml-open_clip-"), f"{v.model_name}.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    open_clip.add_model_config(path)  # the latest registration of a name wins
    _REGISTERED[v.model_name] = text


def _create(v: VisionConfig, device: str, load_weights: bool) -> torch.nn.Module:
    import open_clip

    _register(v)
    name, pretrained = v.model_name, v.weights
    if v.weights is not None and v.weights.startswith("hf-hub:"):
        name, pretrained = v.weights, None
    elif v.weights is not None and os.path.isdir(v.weights):
        name, pretrained = f"local-dir:{os.path.abspath(v.weights)}", None
    loads = v.weights is not None and load_weights
    # Without a checkpoint to load, the text tower (unused here, and often larger than the image tower: SigLIP2's
    # has a 256k-token embedding) is built as a 1-layer stub; the image tower is built first, so its seeded random
    # weights are the same either way.
    stub = {} if loads else {"text_cfg": STUB_TEXT}
    return open_clip.create_model(name, pretrained=pretrained, load_weights=load_weights, device=device,
                                  pretrained_text=False, force_image_size=v.image_size, require_pretrained=loads,
                                  **stub)


def preprocess_config(v: VisionConfig) -> dict[str, Any]:
    """open_clip's inference preprocessing for this model (size, mean, std, resize mode, interpolation), read from
    an architecture built on the meta device (no weights are loaded or allocated)."""
    with torch.device("meta"):
        model = _create(v, device="meta", load_weights=False)
    return dict(model.visual.preprocess_cfg)


class OpenClipPreprocessor:
    """open_clip's eval transform (resize, crop, to tensor, normalise) for PIL RGB images; picklable."""

    input_names = ("pixel_values",)

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self._transform = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "_transform": None}

    @property
    def image_size(self) -> int:
        size = self.cfg["size"]
        return int(size if isinstance(size, int) else max(size))

    def __call__(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        import open_clip

        if self._transform is None:
            c = self.cfg
            self._transform = open_clip.image_transform(
                c["size"], is_train=False, mean=c["mean"], std=c["std"], resize_mode=c["resize_mode"],
                interpolation=c["interpolation"], fill_color=c["fill_color"])
        return {"pixel_values": np.stack([self._transform(img).numpy() for img in images])}


def load_visual(v: VisionConfig) -> tuple[torch.nn.Module, int]:
    """The image tower (on CPU, fp32, eval mode) and its output dimension; the text tower is dropped."""
    model = _create(v, device="cpu", load_weights=True)
    visual = model.visual.eval()
    del model
    size = visual.preprocess_cfg["size"]
    probe = torch.zeros(1, 3, *((size, size) if isinstance(size, int) else size))
    with torch.inference_mode():
        dim = int(visual(probe).shape[-1])
    return visual, dim


def forward(visual: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return visual(inputs["pixel_values"])
