"""The DeepSpeed ZeRO-2/3 engine: the :class:`~vixml_ray.train.engine.Engine` protocol around ``deepspeed.initialize``.

The optimiser (torch AdamW with the backbone/projection groups) and the warm-up + linear-decay schedule are the same
client objects as the DDP engine's, so the two engines follow one LR schedule; clipping comes from the DeepSpeed
config. Checkpoints are DeepSpeed's own sharded ones without the frozen base (``exclude_frozen_parameters``: a LoRA
checkpoint holds the adapter and projection, not 7B frozen weights). The inference export gathers the ZeRO-3
partitions of the trainable parameters first: ``peft``'s ``save_pretrained`` under ZeRO-3 writes an empty adapter.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from vixml_ray.config import Config
from vixml_ray.model.embedder import Embedder
from vixml_ray.train import dist
from vixml_ray.train.deepspeed_config import deepspeed_config
from vixml_ray.train.engine import ChunkedEmbedder, build_optimizer, build_scheduler

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"


class DeepSpeedEngine:
    """ZeRO stage ``cfg.train.zero_stage`` over the ranks of the already initialised process group."""

    def __init__(self, cfg: Config, embedder: Embedder, total_steps: int, device: torch.device):
        import deepspeed

        self.embedder = embedder.to(device)
        self.stage = cfg.train.zero_stage
        optimizer = build_optimizer(self.embedder, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, total_steps)
        self.ds_config = deepspeed_config(cfg, dist.world_size())
        engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=ChunkedEmbedder(self.embedder),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,  # Ray Train already initialised the process group
        )
        self.module: nn.Module = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)

    def step(self) -> float:
        """DeepSpeed clips, steps the optimiser and the schedule and zeroes the gradients in one call."""
        self.module.step()
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save(self, directory: str) -> None:
        """Every rank writes its ZeRO partition (the frozen base excluded) under ``directory``."""
        self.module.save_checkpoint(directory, tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)

    def load(self, directory: str) -> None:
        path, _ = self.module.load_checkpoint(
            directory, tag=CHECKPOINT_TAG, load_module_strict=False,  # the frozen base was not saved
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{CHECKPOINT_TAG}' under {directory}")

    def gathered(self) -> contextlib.AbstractContextManager:
        """A context in which every rank sees the full trainable parameters (ZeRO-3 partitions gathered)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = [p for p in self.embedder.parameters() if p.requires_grad]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The full trained weights (adapter + projection, or all for a full fine-tune) on every rank."""
        with self.gathered():
            return {k: v.detach().clone().cpu() for k, v in self.embedder.trainable_state_dict().items()}

    def export(self, directory: str) -> None:
        """Publishes the inference export from rank 0 with the gathered trainable weights."""
        with self.gathered():
            if dist.rank() == 0:
                self.embedder.save_export(directory, overwrite=True)
        dist.barrier()
        log.info("exported the trained model to %s", os.fspath(directory))
