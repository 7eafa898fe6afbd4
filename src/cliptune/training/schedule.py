"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Factor applied to the base lr before optimizer step `step` (0-based).

    1. Warmup: rise linearly from 1/(warmup+1) to 1 over `warmup_steps` steps (never exactly 0,
       so the first step already learns).
    2. Then decay over the remaining steps: cosine to 0, linear to 0, or constant.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {kind!r}")
