"""The Hugging Face transformers backend: a SigLIP or SigLIP2 vision tower with its attention-pooling head; the
head's output (``pooler_output``, what ``SiglipModel.get_image_features`` returns) is the one vector per image.

``VisionConfig.weights`` is a hub id or a local directory written by ``save_pretrained`` (a full SigLIP model or a
vision-only one: only the vision weights are read); ``None`` = random init from ``model_config`` (keyword arguments
of ``SiglipVisionConfig``, or ``Siglip2VisionConfig`` with ``model_type: siglip2_vision_model``) or from the hub
config of ``model_name``. Preprocessing is the checkpoint's own image processor (``preprocessor_config.json``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from vixml_ray.config import VisionConfig
from vixml_ray.errors import ConfigError

VISION_TYPES = ("siglip_vision_model", "siglip2_vision_model")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Loading a vision tower from a full SigLIP checkpoint lists every unused text weight; hide that report."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def vision_config(v: VisionConfig) -> Any:
    """The ``SiglipVisionConfig``/``Siglip2VisionConfig`` of the tower."""
    from transformers import AutoConfig, Siglip2VisionConfig, SiglipVisionConfig

    if v.model_config is not None and v.weights is None:
        kwargs = dict(v.model_config)
        model_type = kwargs.pop("model_type", "siglip_vision_model")
        if model_type not in VISION_TYPES:
            raise ConfigError(f"vision.model_config.model_type must be one of {VISION_TYPES}, got {model_type!r}")
        return (SiglipVisionConfig if model_type == "siglip_vision_model" else Siglip2VisionConfig)(**kwargs)
    source = v.weights or v.model_name
    config = AutoConfig.from_pretrained(source)
    config = getattr(config, "vision_config", config)  # a full SigLIP config -> its vision part
    if config.model_type not in VISION_TYPES:
        raise ConfigError(f"{source}: the hf_siglip backend needs a SigLIP/SigLIP2 vision model, got "
                          f"model_type {config.model_type!r}")
    return config


def _model_class(config: Any) -> type:
    from transformers import Siglip2VisionModel, SiglipVisionModel

    return SiglipVisionModel if config.model_type == "siglip_vision_model" else Siglip2VisionModel


class HFPreprocessor:
    """The checkpoint's image processor applied to PIL RGB images (numpy outputs); picklable."""

    def __init__(self, processor: Any, naflex: bool):
        self.processor = processor
        self.naflex = naflex
        self.input_names = ("pixel_values", "pixel_attention_mask", "spatial_shapes") if naflex else ("pixel_values",)

    @property
    def image_size(self) -> int:
        size = self.processor.size
        if self.naflex:
            return int(self.processor.patch_size * np.sqrt(self.processor.max_num_patches))
        return int(max(size["height"], size["width"]))

    def __call__(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        out = self.processor(images=images, return_tensors="np")
        return {k: np.asarray(out[k]) for k in self.input_names}


def preprocessor(v: VisionConfig) -> HFPreprocessor:
    from transformers import AutoImageProcessor, Siglip2ImageProcessor, SiglipImageProcessor

    config = vision_config(v)
    naflex = config.model_type == "siglip2_vision_model"
    if naflex and v.image_size is not None:
        raise ConfigError("vision.image_size does not apply to a SigLIP2 NaFlex tower (it takes a patch budget)")
    size = v.image_size or getattr(config, "image_size", None)
    if v.weights is None and v.model_config is not None:
        processor = (Siglip2ImageProcessor(patch_size=config.patch_size, max_num_patches=config.num_patches)
                     if naflex else SiglipImageProcessor(size={"height": size, "width": size}))
    else:
        extra = {"size": {"height": size, "width": size}} if v.image_size is not None else {}
        processor = AutoImageProcessor.from_pretrained(v.weights or v.model_name, **extra)
    return HFPreprocessor(processor, naflex)


def load_vision_model(v: VisionConfig) -> tuple[torch.nn.Module, int]:
    """The vision tower with its pooling head (CPU, fp32, eval mode) and its output dimension."""
    config = vision_config(v)
    if getattr(config, "vision_use_head", True) is False:
        raise ConfigError(f"{v.weights or v.model_name}: vision_use_head=False, the tower has no pooling head")
    cls = _model_class(config)
    if v.weights is None:
        model = cls(config)
    else:
        with _quiet():
            model = cls.from_pretrained(v.weights, dtype=torch.float32)
    return model.eval(), int(config.hidden_size)


def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], interpolate: bool) -> torch.Tensor:
    if "spatial_shapes" in inputs:
        return model(**inputs).pooler_output
    return model(pixel_values=inputs["pixel_values"], interpolate_pos_encoding=interpolate).pooler_output
