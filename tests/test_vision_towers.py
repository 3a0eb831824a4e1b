"""The frozen image towers: both backends load through their real loading code (random init from a config, a local
weights file, a local checkpoint directory) and embed with their own preprocessing."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vixml_ray.config import VisionConfig, replace
from vixml_ray.vision.tiny import TINY_OPEN_CLIP, TINY_OPEN_CLIP_NAME, save_tiny_siglip, tiny_open_clip
from vixml_ray.vision.towers import feature_slug, load_preprocessor, load_tower, model_fingerprint


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(4)]


def _open_clip_model(seed: int):
    import open_clip

    from vixml_ray.vision import openclip_backend

    openclip_backend._register(tiny_open_clip())
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None).eval()


def test_open_clip_random_tower_is_seeded_and_pooled(images):
    v = tiny_open_clip()
    pre = load_preprocessor(v)
    inputs = pre(images)
    assert inputs["pixel_values"].shape == (4, 3, 32, 32) and inputs["pixel_values"].dtype == np.float32
    out = load_tower(v).embed(inputs)
    assert out.shape == (4, TINY_OPEN_CLIP["embed_dim"]) and out.dtype == np.float32
    assert np.array_equal(out, load_tower(v).embed(inputs))  # every actor builds the same random tower
    restored = pickle.loads(pickle.dumps(pre))  # decode tasks receive it pickled
    assert np.array_equal(restored(images)["pixel_values"], inputs["pixel_values"])
    assert feature_slug(v) == f"{TINY_OPEN_CLIP_NAME}.random"


def test_open_clip_weights_file_and_checkpoint_dir(images, tmp_path):
    from safetensors.torch import save_file

    model = _open_clip_model(seed=7)
    save_file(model.state_dict(), str(tmp_path / "tiny.safetensors"))
    v = tiny_open_clip(weights=str(tmp_path / "tiny.safetensors"))
    inputs = load_preprocessor(v)(images)
    with torch.no_grad():
        expected = model.encode_image(torch.from_numpy(inputs["pixel_values"])).numpy()
    np.testing.assert_allclose(load_tower(v).embed(inputs), expected, rtol=1e-5, atol=1e-5)
    assert feature_slug(v) == f"{TINY_OPEN_CLIP_NAME}.tiny"

    # a hub-style checkpoint directory carries its own preprocessing (SigLIP's mean/std 0.5)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(model.state_dict(), str(ckpt / "open_clip_model.safetensors"))
    (ckpt / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_OPEN_CLIP,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                           "resize_mode": "squash"}}))
    v = VisionConfig(backend="open_clip", model_name="unused-for-local-dirs", weights=str(ckpt))
    pre = load_preprocessor(v)
    assert tuple(pre.cfg["mean"]) == (0.5, 0.5, 0.5) and pre.cfg["resize_mode"] == "squash"
    inputs = pre(images)
    with torch.no_grad():
        expected = model.encode_image(torch.from_numpy(inputs["pixel_values"])).numpy()
    np.testing.assert_allclose(load_tower(v).embed(inputs), expected, rtol=1e-5, atol=1e-5)


def test_hf_siglip_matches_get_image_features(images, tmp_path):
    from transformers import AutoImageProcessor, SiglipModel

    path = save_tiny_siglip(str(tmp_path / "siglip"), full_model=True)  # a whole SigLIP, as on the hub
    v = VisionConfig(backend="hf_siglip", model_name="tiny-siglip", weights=path)
    pre = load_preprocessor(v)
    inputs = pickle.loads(pickle.dumps(pre))(images)
    assert inputs["pixel_values"].shape == (4, 3, 32, 32)
    tower = load_tower(v)
    assert tower.dim == 32
    reference = SiglipModel.from_pretrained(path).eval()
    pixels = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_allclose(tower.embed(inputs), expected, rtol=1e-4, atol=1e-5)

    bigger = replace(v, image_size=48)  # a larger input: the processor resizes, the tower interpolates positions
    assert load_preprocessor(bigger)(images)["pixel_values"].shape == (4, 3, 48, 48)
    assert load_tower(bigger).embed(load_preprocessor(bigger)(images)).shape == (4, 32)
    assert feature_slug(bigger).endswith("-48px") and model_fingerprint(bigger) != model_fingerprint(v)


def test_hf_siglip2_naflex_from_config(images):
    v = VisionConfig(backend="hf_siglip", model_name="tiny-siglip2", model_config={
        "model_type": "siglip2_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "patch_size": 8, "num_patches": 16})
    pre = load_preprocessor(v)
    inputs = pre(images)
    assert set(inputs) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    assert load_tower(v).embed(inputs).shape == (4, 32)


def test_bfloat16_on_cpu_is_close_to_float32(images):
    v = tiny_open_clip()
    inputs = load_preprocessor(v)(images)
    full = load_tower(v).embed(inputs)
    half = load_tower(replace(v, dtype="bfloat16")).embed(inputs)
    assert half.dtype == np.float32
    assert np.abs(half - full).max() < 0.05 * np.abs(full).max()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="built-in open_clip model"):
        load_preprocessor(tiny_open_clip(model_name="ViT-B-16-SigLIP2"))
    with pytest.raises(ValueError, match="not a CPU dtype"):
        load_tower(tiny_open_clip(dtype="float16"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            load_tower(tiny_open_clip(num_gpus_per_actor=1.0))
