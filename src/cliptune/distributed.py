"""Gathers across processes (DDP ranks), for training's global-batch loss and sharded evaluation;
and the launched processes of a distributed `cliptune index` (`LaunchedRanks`).

Every gather is the identity in a single process, so callers need no `if distributed` branch.
Ranks may hold different numbers of rows (a micro-batch that lost an unreadable image).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

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



# -- processes that only coordinate (a distributed `cliptune index`) ---------------------------------

class LaunchedRanks:
    """The processes `torchrun` / `accelerate launch` started (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment), joined in a gloo process group to agree on a plan and wait for each other
    (`cliptune.deploy.index.Ranks`).

    gloo also on GPUs: what crosses is a pickled list of file names and a barrier, no tensors, and
    NCCL's watchdog would end a barrier that waits on a slower rank's share of the embedding.
    """

    # A rank waits at the barrier until the slowest has embedded its share: hours for millions of
    # photos. A rank that dies is noticed by the launcher, which stops the others.
    TIMEOUT = timedelta(hours=24)

    def __init__(self) -> None:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=self.TIMEOUT)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def share(self, value: Any) -> Any:
        objects = [value]
        dist.broadcast_object_list(objects, src=0)
        return objects[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        dist.destroy_process_group()


def rank_device(name: str) -> str:
    """`train.device` for this process of a launched job: `auto` and `cuda` mean its own GPU
    (`cuda:LOCAL_RANK`) where there are GPUs, as torchrun numbers them; anything else as given."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name
