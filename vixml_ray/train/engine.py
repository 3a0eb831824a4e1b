"""How the model is stepped: the forward module, optimiser, schedule, clipping, and engine checkpoints.

The loop talks to an :class:`Engine`; :class:`TorchEngine` is plain PyTorch (one process, or DDP when
``torch.distributed`` is initialised). A DeepSpeed engine implements the same protocol around
``deepspeed.initialize`` with the client optimiser and scheduler of :func:`build_optimizer` / :func:`build_scheduler`.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_linear_schedule_with_warmup

from vixml_ray.config import TrainConfig
from vixml_ray.model.embedder import Embedder
from vixml_ray.train import dist

TRAINABLE_FILE, OPTIMIZER_FILE = "trainable.safetensors", "optimizer.pt"


class ChunkedEmbedder(nn.Module):
    """The training forward: embeds a mixed list of queries and labels in ``chunks`` calls of the embedder, each on
    rows of similar length trimmed to their own longest text (dynamic padding). One ``forward`` per step, so DDP
    and DeepSpeed see a single call however many chunks run inside. With ``label_rows`` (the label ids of the LAST
    ``len(label_rows)`` items) it also returns those labels' vectors (PRIME prototypes; possibly zero rows, which
    still give every prototype parameter a (zero) gradient, as DDP needs)."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, feats: torch.Tensor | None,
                mask: torch.Tensor | None, chunks: int, label_rows: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(lengths, stable=True)
        outputs = []
        for part in torch.tensor_split(order, chunks):
            if part.numel() == 0:
                continue
            width = max(int(lengths[part].max()), 1)
            outputs.append(self.embedder(ids[part, :width], lengths[part],
                                         None if feats is None else feats[part], None if mask is None else mask[part]))
        out = torch.cat(outputs)[torch.argsort(order)]
        if label_rows is None:
            return out
        return out, self.embedder.label_vectors(out[len(out) - len(label_rows):], label_rows)


class Engine(Protocol):
    """What the loop needs from a training engine (plain/DDP here; DeepSpeed plugs in the same way)."""

    module: nn.Module  # a ChunkedEmbedder, possibly wrapped (DDP, DeepSpeedEngine): the training forward
    embedder: Embedder  # the bare embedder (inference, export)
    optimizer: torch.optim.Optimizer  # its param_groups hold the current learning rates

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Clips, steps the optimiser and the schedule, zeroes gradients; returns the pre-clip gradient norm."""
        ...

    def save(self, directory: str) -> None:
        """Writes this rank's part of an engine checkpoint (every rank calls it)."""
        ...

    def load(self, directory: str) -> None: ...

    def export(self, directory: str) -> None:
        """Publishes the inference export (:meth:`Embedder.save_export`) once, from the full trained weights."""
        ...


def build_optimizer(embedder: Embedder, train: TrainConfig) -> torch.optim.AdamW:
    groups = embedder.param_groups(train.lr_backbone, train.lr_projection, train.weight_decay, train.lr_prototypes)
    return torch.optim.AdamW(groups, eps=train.adam_eps)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    """transformers' linear schedule: the LR factor rises linearly from 0 at step 0 to 1 at ``train.warmup_steps``,
    then falls linearly to 0 at ``total_steps``."""
    return get_linear_schedule_with_warmup(optimizer, train.warmup_steps, total_steps)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current LR of each parameter group, as ``lr_<group name>``."""
    return {f"lr_{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


class TorchEngine:
    """AdamW with backbone/projection groups, warm-up + linear decay, gradient clipping; DDP when distributed."""

    def __init__(self, embedder: Embedder, train: TrainConfig, total_steps: int, device: torch.device):
        self.embedder = embedder.to(device)
        self.train_cfg = train
        chunked = ChunkedEmbedder(self.embedder)
        if dist.is_distributed():
            device_ids = [device.index] if device.type == "cuda" else None
            # buffers (prototype centroids and clusters) are computed identically on every rank: no per-step broadcast
            self.module: nn.Module = nn.parallel.DistributedDataParallel(chunked, device_ids=device_ids,
                                                                         broadcast_buffers=False)
        else:
            self.module = chunked
        self.optimizer = build_optimizer(self.embedder, train)
        self.scheduler = build_scheduler(self.optimizer, train, total_steps)
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        max_norm = self.train_cfg.clip_grad_norm if self.train_cfg.clip_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, directory: str) -> None:
        if dist.rank() != 0:  # DDP replicas are identical
            return
        tensors = {k: v.contiguous().cpu() for k, v in self.embedder.trainable_state_dict().items()}
        save_file(tensors, os.path.join(directory, TRAINABLE_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   os.path.join(directory, OPTIMIZER_FILE))

    def export(self, directory: str) -> None:
        if dist.rank() == 0:
            self.embedder.save_export(directory, overwrite=True)
        dist.barrier()

    def load(self, directory: str) -> None:
        device = next(self.embedder.parameters()).device
        self.embedder.load_trainable_state_dict(load_file(os.path.join(directory, TRAINABLE_FILE), device=str(device)))
        state = torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location=device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
