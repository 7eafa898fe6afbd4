"""Gathers across processes (DDP ranks), for training's global-batch loss and sharded evaluation.

Every function is the identity in a single process, so callers need no `if distributed` branch.
Ranks may hold different numbers of rows (a micro-batch that lost an unreadable image).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_sizes(rows: int, device: torch.device) -> list[int]:
    """Every rank's row count: a micro-batch that lost an unreadable image is shorter than the others'.
    Tensors with the same rows (a batch's image and text features, its ids) can share one call."""
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(size) for size in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (rows may differ between ranks); the backward pass sums every rank's
    gradient for this rank's rows, since every rank's loss used them."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return _gather_padded(tensor.contiguous(), sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # all_reduce works in place: never on autograd's own buffer
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None


def gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, in rank order, keeping the autograd graph.

    Each rank's share of the gradient is sent back to it (summed over the ranks' losses), so every
    rank's loss over the global batch yields the full gradient once DDP averages it. Ranks may hold
    different numbers of rows.
    """
    if _world() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, sizes or gather_sizes(len(tensor), tensor.device))


def gather_rows(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, in rank order, without gradients (the
    batch's image ids, evaluation embeddings). Row counts may differ between ranks."""
    if _world() == 1:
        return tensor
    return _gather_padded(tensor.contiguous(), sizes or gather_sizes(len(tensor), tensor.device))

