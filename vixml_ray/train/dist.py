"""Collectives the training loop needs, as plain functions over ``torch.distributed`` (identity on one process).

:func:`all_gather` concatenates every rank's rows (shares may differ in size) and lets gradients flow back to the
local share: every rank then computes the SAME loss on the whole global batch, and the gradient of that loss w.r.t.
this rank's parameters through its own rows is exactly this rank's share of the one-process gradient. DDP and
DeepSpeed AVERAGE gradients over ranks, so the loop multiplies the loss by the world size before ``backward``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        me = torch_dist.get_rank()
        ctx.offset, ctx.size = sum(sizes[:me]), sizes[me]
        width = max(sizes)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        torch_dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad[ctx.offset : ctx.offset + ctx.size].contiguous(), None


def all_gather(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Rows of every rank concatenated in rank order; ``sizes[r]`` = rows of rank r (``x`` has ``sizes[rank]``)."""
    sizes = tuple(int(s) for s in sizes)
    if not is_distributed():
        return x
    if len(sizes) != torch_dist.get_world_size() or x.shape[0] != sizes[torch_dist.get_rank()]:
        raise ValueError(f"all_gather: rank {torch_dist.get_rank()} has {x.shape[0]} rows, sizes {sizes}")
    return _AllGather.apply(x, sizes)


def all_gather_array(x: np.ndarray, sizes: Sequence[int], device: torch.device | None = None) -> np.ndarray:
    """:func:`all_gather` for numpy rows without gradients (embedding banks, evaluation)."""
    if not is_distributed():
        return x
    with torch.no_grad():
        return all_gather(torch.as_tensor(x, device=device), sizes).cpu().numpy()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()
