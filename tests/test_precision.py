"""bf16 autocast (``model.compute_dtype``): detection and its off switch, the backbone computing in bf16 over fp32
weights with fp32 outputs, loss and gradients, training that tracks fp32, and MiniLM embeddings close to fp32's."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from vixml_ray.config import load_config
from vixml_ray.errors import ConfigError
from vixml_ray.model import build_embedder, embed_arrays, tokenize
from vixml_ray.devices import autocast, compute_dtype, native_bf16
from vixml_ray.train.engine import TorchEngine
from vixml_ray.train.loss import TripletLossConfig
from vixml_ray.train.positives import PositiveSampler
from vixml_ray.train.step import forward_loss, make_step_batch, train_step

from test_train_step import _data

CPU = torch.device("cpu")


def _cpuinfo_flags() -> set[str] | None:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_auto_follows_the_cpu_and_float32_forces_it_off() -> None:
    flags = _cpuinfo_flags()
    if flags is not None:  # torch's cpuinfo and the kernel's flags agree on native bf16
        assert native_bf16("cpu") == bool({"amx_bf16", "avx512_bf16"} & flags)
    assert compute_dtype("auto", "float32", "cpu") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    assert compute_dtype("float32", "float32", "cpu") == torch.float32
    assert isinstance(autocast("float32", "float32", CPU), contextlib.nullcontext)
    assert compute_dtype("bfloat16", "float32", "cpu") == torch.bfloat16
    with autocast("bfloat16", "float32", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    # weights stored in bf16/fp16 (DeepSpeed's bf16 mode) compute in their dtype: no autocast on top
    assert compute_dtype("auto", "bfloat16", "cpu") == torch.bfloat16
    assert isinstance(autocast("auto", "bfloat16", CPU), contextlib.nullcontext)
    assert compute_dtype("auto", "float16", "cuda") == torch.float16
    with pytest.raises(ConfigError, match="'model.compute_dtype'=bfloat16 autocasts float32 weights"):
        load_config(None, ["model.dtype=bfloat16", "model.compute_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="model.compute_dtype"):
        load_config(None, ["model.compute_dtype=fp8"])


def _cfg(cache: Path, compute: str):
    return load_config(None, [f"cache_dir={cache}", "model.name_or_path=tiny:bert", "model.max_length=10",
                              "train.lr_backbone=3e-3", "train.warmup_steps=0", "train.epochs=1",
                              f"model.compute_dtype={compute}"])


def test_bf16_backbone_with_fp32_weights_outputs_loss_and_gradients(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, "bfloat16")
    engine = TorchEngine(build_embedder(cfg, None), cfg.train, total_steps=4, device=CPU)
    seen: list[torch.dtype] = []
    linear = next(m for m in engine.embedder.backbone.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    queries, labels_tok, labels = _data()
    sampled = PositiveSampler(labels, seed=0).sample(0)
    batch = make_step_batch(np.arange(32), sampled, labels, queries, labels_tok, None, 16, CPU)
    loss = forward_loss(engine, batch, TripletLossConfig(num_negatives=5))
    assert seen and set(seen) == {torch.bfloat16}  # the backbone's matrix products ran in bf16
    assert loss.dtype == torch.float32 and loss.item() > 0
    out = engine.embedder(torch.as_tensor(queries.ids[:4], dtype=torch.long),
                          torch.as_tensor(queries.lengths[:4], dtype=torch.long))
    assert out.dtype == torch.float32  # embeddings, hence similarities and the loss, are fp32
    loss.backward()
    params = [p for p in engine.embedder.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    engine.step()
    state = engine.optimizer.state[params[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32  # fp32 optimiser state


def _train(cache: Path, compute: str, steps: int = 12) -> list[float]:
    torch.manual_seed(0)
    cfg = _cfg(cache, compute)
    engine = TorchEngine(build_embedder(cfg, None), cfg.train, total_steps=steps, device=CPU)
    queries, labels_tok, labels = _data()
    sampled = PositiveSampler(labels, seed=0).sample(0)
    batch = make_step_batch(np.arange(32), sampled, labels, queries, labels_tok, None, 16, CPU)
    return [train_step(engine, batch, TripletLossConfig(num_negatives=5))[0] for _ in range(steps)]


def test_bf16_training_tracks_fp32(tmp_path: Path) -> None:
    fp32, bf16 = _train(tmp_path, "float32"), _train(tmp_path, "bfloat16")
    assert bf16 != fp32  # autocast changed the arithmetic ...
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.01)  # ... not the training
    assert min(bf16[-3:]) < 0.5 * bf16[0]


def test_minilm_bf16_embeddings_are_close_to_fp32(minilm_path: Path, tmp_path: Path) -> None:
    texts = ["how long to boil an egg", "cast iron pan seasoning", "substitute for buttermilk in pancakes",
             "why does my bread not rise", "storing fresh herbs", "knife sharpening angle"]
    out = {}
    for compute in ("float32", "bfloat16"):
        cfg = load_config(None, [f"model.name_or_path={minilm_path}", f"cache_dir={tmp_path}",
                                 f"model.compute_dtype={compute}"])
        embedder = build_embedder(cfg, None)
        out[compute] = embed_arrays(embedder, tokenize(embedder.tokenizer, texts, 32), batch_size=4)
    assert out["bfloat16"].dtype == np.float32 and not np.array_equal(out["bfloat16"], out["float32"])
    cosine = (out["bfloat16"] * out["float32"]).sum(1)
    assert cosine.min() > 0.99, cosine
    # the neighbours agree: the same nearest text for every text
    def nearest(e: np.ndarray) -> np.ndarray:
        return np.argsort(-(e @ e.T), axis=1)[:, 1]
    assert (nearest(out["bfloat16"]) == nearest(out["float32"])).all()
