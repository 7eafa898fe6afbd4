"""The optimizer side of a step: AdamW with its learning-rate schedule (schedule.py), built from the
config, and the gradients applied: unscaled (fp16), clipped, stepped, the schedule advanced."""

from __future__ import annotations

import torch

from cliptune.config import TrainConfig
from cliptune.training.schedule import lr_multiplier


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, total_steps: int,
                    device: torch.device) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable `params` and its schedule over `total_steps` optimizer steps."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")
    warmup = int(config.warmup_ratio * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, config.schedule))


def apply_gradients(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler | None, params: list[torch.nn.Parameter],
                    max_grad_norm: float | None) -> float | None:
    """Clip, step, schedule, clear the gradients. Returns the gradient norm (None when clipping is off)."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping compares the true norm with max_grad_norm
    norm = None
    if max_grad_norm is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
