"""Cheaper LoRA training steps on CPUs: a faster dropout mask and a fused LoRA branch.

Both compute what PEFT's LoRA computes; they only do fewer passes over memory. `use_fast_lora`
swaps them into a PEFT model (and back); `lora.fast_path` (on by default) does it in training.

**FastDropout.** PEFT puts an `nn.Dropout` before every LoRA branch: 144 of them in ViT-B/32 with adapters on six
layers of both towers. On a CPU drawing the mask is the cost, not the multiply: one Bernoulli draw
per activation entry is a sizeable fraction of the matmul beside it, and all of them together are a
visible share of a LoRA training step (the profile and timings: docs/speed.md).

`FastDropout` draws 64 random bits per 4 mask entries (each a 16-bit slice compared with a
threshold) instead of one Bernoulli draw per entry: a quarter of the random numbers. The drop
probability is quantised to 1/65536 (p = 0.1 becomes 0.1000061), and the kept entries are scaled
by the exact inverse of the quantised keep probability, so the expectation is unchanged. The mask
comes from torch's default generator, so `torch.get_rng_state`/`set_rng_state` replay it (exact
accumulation and activation checkpointing rely on that). On other devices it is `F.dropout`.

**FusedLoraLinear.** PEFT's branch is `result + lora_B(lora_A(dropout(x))) * scaling`: three passes
over an (N, d) tensor besides the two small matmuls (the dropout's rescale, `* scaling`, `+`).
Here the dropout rescale and `scaling` multiply the rank-r intermediate instead, and `addmm` adds
the branch into the base output in the matmul itself (measured in docs/speed.md, `lora.fast_path`
row). It applies to CPU tensors outside autocast with one
plain LoRA adapter active; anything else (GPU, bf16, DoRA, merged or disabled adapters, mixed
adapter batches) goes through PEFT's own forward.
"""

from __future__ import annotations

import math

import peft
import torch
import torch.nn.functional as F
from torch import nn

_PeftLinear = peft.tuners.lora.Linear

_LEVELS = 1 << 16  # a mask entry is one 16-bit slice of a random 64-bit integer


def quantized_drop_probability(p: float) -> float:
    return round(p * _LEVELS) / _LEVELS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask, True with probability 1 - quantized_drop_probability(p), entries independent."""
    count = math.prod(shape)
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


class FusedLoraLinear(_PeftLinear):
    """PEFT's `lora.Linear` with the fused CPU training forward above; swapped in by class, so the
    module's weights, state dict, merging and saving are PEFT's own."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if (args or kwargs or adapter is None or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or self.disable_adapters or self.merged or adapter not in self.lora_A
                or adapter in self.lora_variant or x.dtype != self.lora_A[adapter].weight.dtype):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        dropout, scale = self.lora_dropout[adapter], self.scaling[adapter]
        if isinstance(dropout, FastDropout) and dropout.training and dropout.p > 0:
            branch_input = x * keep_mask(x.shape, dropout.p, x.device)
            scale = scale / (1.0 - quantized_drop_probability(dropout.p))
        else:
            branch_input = dropout(x)
        low_rank = F.linear(branch_input, self.lora_A[adapter].weight) * scale  # (..., r): cheap to scale
        out = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                          self.lora_B[adapter].weight.t())
        return out.view(result.shape)


def use_fast_lora(model: nn.Module, enabled: bool) -> int:
    """Swap PEFT's LoRA dropouts for `FastDropout` and its `lora.Linear` for `FusedLoraLinear` (or
    back). Returns how many modules changed. Neither holds weights of its own, so adapters save
    and load the same either way."""
    swapped = 0
    for module in model.modules():
        if enabled and type(module) is _PeftLinear:
            module.__class__ = FusedLoraLinear
            swapped += 1
        elif not enabled and type(module) is FusedLoraLinear:
            module.__class__ = _PeftLinear
            swapped += 1
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if enabled and type(layer) is nn.Dropout:
                replacement = FastDropout(layer.p)
            elif not enabled and isinstance(layer, FastDropout):
                replacement = nn.Dropout(layer.p)
            else:
                continue
            replacement.train(layer.training)
            dropouts[name] = replacement
            swapped += 1
    return swapped


__all__ = ["FastDropout", "FusedLoraLinear", "keep_mask", "quantized_drop_probability", "use_fast_lora"]
