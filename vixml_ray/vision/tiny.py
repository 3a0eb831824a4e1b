"""Tiny random vision towers for tests and demos (milliseconds per image on a CPU), built from configs.

* :func:`tiny_open_clip` -- a 2-layer, 32-wide ViT (patch 8, 32x32 input) registered as a custom open_clip
  architecture through ``VisionConfig.model_config``;
* :func:`save_tiny_siglip` -- a 2-layer ``SiglipVisionModel`` with its pooling head plus its image processor,
  written with ``save_pretrained`` so the ordinary hub/local loading path reads it back.
"""

from __future__ import annotations

from typing import Any

import torch

from vixml_ray.config import VisionConfig, replace

TINY_OPEN_CLIP_NAME = "vixml-tiny-vit"
TINY_OPEN_CLIP: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
TINY_SIGLIP: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


def tiny_open_clip(**changes: Any) -> VisionConfig:
    """A :class:`VisionConfig` of the tiny open_clip tower (random weights), with dotted ``changes``."""
    base = VisionConfig(backend="open_clip", model_name=TINY_OPEN_CLIP_NAME, model_config=dict(TINY_OPEN_CLIP))
    return replace(base, **changes) if changes else base


def save_tiny_siglip(path: str, full_model: bool = False, seed: int = 0) -> str:
    """Writes a tiny SigLIP checkpoint (a vision-only ``SiglipVisionModel``, or with ``full_model`` a whole
    ``SiglipModel`` with a tiny text tower, as hub checkpoints are) and its ``SiglipImageProcessor`` to ``path``."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(**TINY_SIGLIP)
    if full_model:
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 0}
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision.to_dict()))
    else:
        model = SiglipVisionModel(vision)
    model.save_pretrained(path)
    size = TINY_SIGLIP["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    return path
