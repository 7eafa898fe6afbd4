"""Timing that survives a shared machine: what `cliptune bench` measures with.

Variants are called interleaved (a, b, a, b, ...) and each rate comes from the median call, so load
from other processes slows every variant alike and one burst moves nothing; the ratios between
variants of one run are what to read. A GPU is synchronised before the clock is read.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from cliptune.runtime import PeakMemory


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rates(fns: dict[str, Callable[[], int]], steps: int, warmup: int, device: torch.device,
                      memory: dict[str, float] | None = None) -> dict[str, float]:
    """Items per second of each `fn` (which returns how many items it processed), from its median
    call time. The calls are interleaved (a, b, a, b, ...) so that load from other processes slows
    every variant alike.
    Warm-up calls run first, each variant's under a peak-memory probe (MiB into `memory`) when given."""
    for name, fn in fns.items():
        with PeakMemory(device) as peak:
            for _ in range(warmup):
                fn()
            sync_device(device)
        if memory is not None:
            memory[name] = round(peak.gb * 1024)  # MiB
    durations: dict[str, list[float]] = {name: [] for name in fns}
    items = dict.fromkeys(fns, 0)
    for _ in range(steps):
        for name, fn in fns.items():
            started = time.perf_counter()
            items[name] += fn()
            sync_device(device)
            durations[name].append(time.perf_counter() - started)
    # The median call: one call slowed by another process's burst does not move it.
    return {name: items[name] / (statistics.median(durations[name]) * len(durations[name])) for name in fns}


def bf16_matmul_speedup(device: torch.device) -> float:
    """fp32 time / bf16 time of a ViT-B-sized matmul. Without native bf16 (AVX-512 BF16 / AMX) a CPU
    emulates it, tens of times slower: probe before timing whole training steps in bf16."""
    a, w = torch.randn(128, 768, device=device), torch.randn(768, 768, device=device)
    times = []
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), w.to(dtype)
        x @ y
        sync_device(device)
        started = time.perf_counter()
        for _ in range(3):
            x @ y
        sync_device(device)
        times.append(time.perf_counter() - started)
    return times[0] / times[1]
