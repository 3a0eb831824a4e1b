"""The torch devices and dtypes that configs name (``*.num_gpus_per_actor``, ``model.dtype``, ``vision.dtype``), and the
dtype the embedder computes in.

The dtype the embedder computes in: bf16 autocast over fp32 weights where the device runs bf16 natively.

``model.compute_dtype`` (training forward/backward, every embedding pass of training, label refresh, evaluation and
the predictor, which all run :meth:`Embedder.forward`): ``float32`` computes in fp32; ``bfloat16`` runs the embedder's
forward under ``torch.autocast(device, bfloat16)``; ``auto`` does that where bf16 is native and computes in fp32
elsewhere. Native means: on CUDA ``torch.cuda.is_bf16_supported()``; on CPU the AMX-BF16 or AVX512-BF16 instructions,
as ``torch.cpu.get_capabilities()`` reports them (cpuinfo's CPUID flags ``amx_bf16`` / ``avx512_bf16``; plain
AVX-512 only emulates bf16 and is slower than fp32). Autocast leaves the weights, their gradients and the optimiser
state in fp32 (the master copy); pooled outputs are cast back to fp32, so losses and similarities are fp32.

Autocast applies only over fp32 weights (``model.dtype: float32``). Weights stored in bf16/fp16 already compute in
their dtype (under DeepSpeed that is its bf16/fp16 mode, which keeps fp32 master weights itself), so there is no
autocast on top of it: ``auto`` resolves to the weights' dtype and an explicit ``bfloat16`` is a config error
(:func:`vixml_ray.config.validate`). DeepSpeed's own ``torch_autocast`` section is never enabled: the autocast runs
inside the module's forward, the same under DDP, DeepSpeed and inference.
"""

from __future__ import annotations

import contextlib
import functools

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

@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """Whether devices of ``device_type`` ("cpu", "cuda") run bf16 matrix products natively (see module doc)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    return False


def compute_dtype(choice: str, weights_dtype: str, device_type: str) -> torch.dtype:
    """The dtype the forward computes in for ``model.compute_dtype`` = ``choice`` and ``model.dtype`` =
    ``weights_dtype`` on ``device_type``: the weights' own unless they are fp32; then bf16 for ``bfloat16``, or
    for ``auto`` where bf16 is native; else fp32."""
    if weights_dtype != "float32":
        return DTYPES[weights_dtype]
    if choice == "bfloat16" or (choice == "auto" and native_bf16(device_type)):
        return torch.bfloat16
    if choice in ("float32", "auto"):
        return torch.float32
    raise ValueError(f"unknown compute_dtype {choice!r} (auto, float32, bfloat16)")


def autocast(choice: str, weights_dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 on ``device`` when :func:`compute_dtype` says so over fp32 weights, else a no-op."""
    if weights_dtype == "float32" and compute_dtype(choice, weights_dtype, device.type) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
