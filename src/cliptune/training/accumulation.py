"""One optimizer step's forward and backward passes over its micro-batches: `accumulate_gradients`.

One step sees `micro_batch_size * grad_accum_steps * world_size` pairs. With `exact` accumulation the
loss is computed over all of them at once (GradCache): micro-batches are first encoded without
gradients, the loss's gradient with respect to those cached features is computed, and each
micro-batch is then re-encoded with gradients and back-propagated with its share, replaying the same
dropout. Gradients equal one big batch's at a micro-batch's memory. `plain` accumulation makes each
micro-batch its own contrastive problem and averages their losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, NamedTuple

import torch

from cliptune.data.preprocessing import Preprocessing
from cliptune.distributed import gather_rows, gather_sizes, gather_with_grad
from cliptune.training.stopping import TrainingError

if TYPE_CHECKING:
    from cliptune.models.contrastive import ContrastiveModel

# (pixels, input_ids, attention_mask) -> raw (not normalised) image and text features, (B, D) each
Encode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (image features, text features, image ids) -> the scalar loss over those pairs
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MicroBatch(NamedTuple):
    """A micro-batch as model inputs, on the training device."""

    pixels: torch.Tensor  # (B, 3, S, S) float, normalised as the model's processor does
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    image_ids: torch.Tensor  # (B,) long; equal ids = the same image, positives of each other

    @classmethod
    def on_device(cls, batch: dict, preprocessing: Preprocessing, device: torch.device,
                  augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> MicroBatch:
        """A loader's micro-batch (uint8 pixels, see data/batches.py) as model inputs on `device`.
        The pixels travel as uint8 (pinned by the loader on CUDA, so the copy overlaps); `augment`
        (device augmentation) turns them into the model's input size, still uint8, before normalising."""
        pixels = batch["pixels"].to(device, non_blocking=True)
        if augment is not None:
            pixels = augment(pixels)
        return cls(preprocessing.normalize(pixels), batch["input_ids"].to(device, non_blocking=True),
                   batch["attention_mask"].to(device, non_blocking=True),
                   batch["image_ids"].to(device, non_blocking=True))


class _RngReplay:
    """Snapshot of the torch RNG, so a re-encode replays the same dropout masks."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def across_ranks(loss: BatchLoss) -> BatchLoss:
    """`loss` over every process's pairs: features gathered with their gradients (each rank's share of
    the gradient flows back to it), image ids without; one exchange of row counts serves all three."""

    def gathered(image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        sizes = gather_sizes(len(image), image.device)
        return loss(gather_with_grad(image, sizes), gather_with_grad(text, sizes), gather_rows(image_ids, sizes))

    return gathered


def enable_gradient_checkpointing(model: ContrastiveModel) -> None:
    """Recompute the towers' activations in the backward pass instead of keeping them: less memory
    for a bigger micro-batch, about a third more compute (`train.gradient_checkpointing`)."""
    base = model.base
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise TrainingError("train.gradient_checkpointing: this model does not support it")
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def accumulate_gradients(micro_batches: Sequence[MicroBatch], encode: Encode, loss: BatchLoss, *, exact: bool,
                         device: torch.device, scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         no_sync: Callable[[], AbstractContextManager] | None = None) -> torch.Tensor:
    """Forward and backward passes of one optimizer step; the gradients are left in the parameters'
    `.grad` and the step's loss is returned (detached).

    `loss` sees the global batch (wrap it in `across_ranks` under DDP). `scale` multiplies what is
    back-propagated from a loss (fp16's GradScaler.scale). `no_sync` (DDP's `no_sync`) skips the
    gradient all-reduce for every backward pass but the step's last.
    """
    # A single micro-batch is already the whole batch: exact and plain are the same computation,
    # and the plain one encodes once instead of twice.
    if not exact or len(micro_batches) == 1:
        return _plain_step(micro_batches, encode, loss, scale, no_sync)
    return _exact_step(micro_batches, encode, loss, device, scale, no_sync)


def _synced_if(last: bool, no_sync: Callable[[], AbstractContextManager] | None) -> AbstractContextManager:
    return no_sync() if no_sync is not None and not last else contextlib.nullcontext()


def _plain_step(micro_batches, encode: Encode, loss: BatchLoss, scale, no_sync) -> torch.Tensor:
    losses = []
    for i, (pixels, ids, mask, image_ids) in enumerate(micro_batches):
        with _synced_if(i == len(micro_batches) - 1, no_sync):
            image, text = encode(pixels, ids, mask)
            part = loss(image, text, image_ids) / len(micro_batches)
            torch.autograd.backward([scale(part) if scale is not None else part])
        losses.append(part.detach())
    return torch.stack(losses).sum()


def _exact_step(micro_batches, encode: Encode, loss: BatchLoss, device: torch.device, scale,
                no_sync) -> torch.Tensor:
    # 1: encode every micro-batch without gradients, noting the RNG state each encode starts from.
    snapshots, image_cache, text_cache = [], [], []
    with torch.no_grad():
        for pixels, ids, mask, _ in micro_batches:
            snapshots.append(_RngReplay(device))
            image, text = encode(pixels, ids, mask)
            image_cache.append(image.float())
            text_cache.append(text.float())
    after = _RngReplay(device)
    # 2: the loss over the whole (global) batch, and its gradient w.r.t. the cached features.
    image_all = torch.cat(image_cache).requires_grad_(True)
    text_all = torch.cat(text_cache).requires_grad_(True)
    total = loss(image_all, text_all, torch.cat([batch.image_ids for batch in micro_batches]))
    torch.autograd.backward([scale(total) if scale is not None else total])
    image_grads = image_all.grad.split([len(x) for x in image_cache])
    text_grads = text_all.grad.split([len(x) for x in text_cache])
    # 3: re-encode each micro-batch with gradients, replaying its dropout, and back-propagate its share.
    for i, (pixels, ids, mask, _) in enumerate(micro_batches):
        snapshots[i].restore()
        with _synced_if(i == len(micro_batches) - 1, no_sync):
            image, text = encode(pixels, ids, mask)
            torch.autograd.backward([image.float(), text.float()], [image_grads[i], text_grads[i]])
    after.restore()
    return total.detach()
