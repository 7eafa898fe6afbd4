"""A cheaper inverted dropout for LoRA's input on CPUs.

PEFT puts an `nn.Dropout` before every LoRA branch: 144 of them in ViT-B/32 with adapters on six
layers of both towers. On a CPU drawing the mask is the cost, not the multiply: `F.dropout` on a
(400, 768) activation takes about half as long as the (400, 768) x (768, 768) matmul beside it, and
all of them together were 18 % of a LoRA training step (torch.profiler, micro-batch 8).

`FastDropout` draws 64 random bits per 4 mask entries (each a 16-bit slice compared with a
threshold) instead of one Bernoulli draw per entry: about 4.5x cheaper on a CPU. The drop
probability is quantised to 1/65536 (p = 0.1 becomes 0.1000061), and the kept entries are scaled
by the exact inverse of the quantised keep probability, so the expectation is unchanged. The mask
comes from torch's default generator, so `torch.get_rng_state`/`set_rng_state` replay it (exact
accumulation and activation checkpointing rely on that). On other devices it is `F.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # a mask entry is one 16-bit slice of a random 64-bit integer


def quantized_drop_probability(p: float) -> float:
    return round(p * _LEVELS) / _LEVELS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask, True with probability 1 - quantized_drop_probability(p), entries independent."""
    count = 1
    for size in shape:
        count *= size
    bits = torch.randint(-(1 << 63), (1 << 63) - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    slices = bits.view(torch.int16)[:count].view(shape)  # uniform over [-32768, 32767]
    threshold = round(p * _LEVELS) - (_LEVELS // 2)
    return slices >= threshold  # P = (32768 - threshold) / 65536 = 1 - round(p * 65536) / 65536


class FastDropout(nn.Module):
    """Drop-in for `nn.Dropout(p)` (inverted dropout, identity in eval mode); see the module docstring."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} is not in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":  # GPU dropout is a fused kernel already
            return F.dropout(x, self.p, training=True)
        out = x * keep_mask(x.shape, self.p, x.device)
        return out.mul_(1.0 / (1.0 - quantized_drop_probability(self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


__all__ = ["FastDropout", "keep_mask", "quantized_drop_probability"]
