"""Contrastive losses over a batch of image and caption features: pure functions.

Both losses take `image_ids`: two captions of the same image in one batch are both positives,
never each other's negatives (the false-negative problem of multi-caption training).
Features may be gathered across processes first (`gather_with_grad`), so the negatives are the
global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def same_image_mask(image_ids: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: entry (i, j) is True when pair i and pair j show the same image."""
    return image_ids[:, None] == image_ids[None, :]


def clip_loss(
    image_features: torch.Tensor,  # (B, D), any norm
    text_features: torch.Tensor,  # (B, D); row i is the caption paired with image row i
    logit_scale: torch.Tensor,  # scalar, already exponentiated
    image_ids: torch.Tensor | None = None,  # (B,) which image each pair shows
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss). Other captions of the same image are removed from the
    negatives of each row and column instead of being pushed away."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float() * image @ text.T  # (B_images, B_texts)
    if image_ids is not None:
        duplicates = same_image_mask(image_ids) & ~torch.eye(len(image_ids), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(duplicates, float("-inf"))
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(
    image_features: torch.Tensor,  # (B, D)
    text_features: torch.Tensor,  # (B, D)
    logit_scale: torch.Tensor,  # scalar, already exponentiated
    logit_bias: torch.Tensor | None,  # scalar
    image_ids: torch.Tensor | None = None,  # (B,)
) -> torch.Tensor:
    """SigLIP's sigmoid loss (Zhai et al. 2023, eq. 1): every image-caption pair is a binary
    problem, positive when both show the same image; summed over pairs, divided by the batch size."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float() * image @ text.T  # (B, B)
    if logit_bias is not None:
        logits = logits + logit_bias.float()
    if image_ids is None:
        positive = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    else:
        positive = same_image_mask(image_ids)
    signs = positive.float() * 2 - 1  # +1 for matching pairs, -1 otherwise
    return -F.logsigmoid(signs * logits).sum() / len(logits)


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


gather_ids = gather_rows  # the name the training step reads best with
