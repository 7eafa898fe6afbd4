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


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, keeping the autograd graph.

    torch.distributed.nn's all_gather sends each rank's share of the gradient back to it, so every
    rank's loss over the global batch yields the full gradient once DDP averages it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Concatenate integer ids from every process (no gradient needed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts, dim=0)
