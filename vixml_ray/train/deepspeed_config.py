"""The DeepSpeed config, generated from the typed config (the JSON examples in ``cluster/`` come from here)."""

from __future__ import annotations

from typing import Any

from vixml_ray.config import Config


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """ZeRO-2/3 config for ``world_size`` ranks sharing ``cfg.train.batch_size`` queries per global batch.

    The optimiser and LR schedule are passed to ``deepspeed.initialize`` as client objects (torch AdamW with the
    backbone/projection parameter groups), so no fused op is JIT-built and the schedule matches the DDP engine.
    """
    train = cfg.train
    micro = max(1, train.batch_size // max(1, world_size))
    zero: dict[str, Any] = {
        "stage": train.zero_stage,
        "overlap_comm": train.use_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": 50_000_000,
    }
    if train.zero_stage == 3:
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": 50_000_000,
                "stage3_param_persistence_threshold": 100_000,
            }
        )
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * max(1, world_size),
        "gradient_clipping": train.clip_grad_norm if train.clip_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,
    }
