"""Contrastive losses over a batch of image and caption features: pure functions.

Both losses take `image_ids`: two captions of the same image in one batch are both positives,
never each other's negatives (the false-negative problem of multi-caption training).
Features may be gathered across processes first (`cliptune.distributed.gather_with_grad`), so the
negatives are the global batch. `contrastive_loss` picks the one a run's config asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cliptune.config import RunConfig
    from cliptune.models.contrastive import ContrastiveModel


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


def contrastive_loss(config: RunConfig, family: str) -> Callable[..., torch.Tensor]:
    """The loss `train.loss` asks for, as `loss(image, text, model, image_ids)` with the model's current
    temperature (and SigLIP's bias); `.kind` names it. `auto`: sigmoid for SigLIP, InfoNCE otherwise."""
    kind = config.train.loss if config.train.loss != "auto" else ("siglip" if family == "siglip" else "clip")

    def loss_fn(image: torch.Tensor, text: torch.Tensor, model: ContrastiveModel,
                image_ids: torch.Tensor) -> torch.Tensor:
        scale = model.logit_scale.exp()
        if kind == "siglip":
            bias = model.logit_bias
            if bias is None:
                bias = torch.zeros((), device=image.device)
            return siglip_loss(image, text, scale, bias, image_ids)
        return clip_loss(image, text, scale, image_ids)

    loss_fn.kind = kind
    return loss_fn
