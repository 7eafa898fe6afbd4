"""Where a command computes, in what precision, and how much memory it took: one place for train,
eval, bench and index.

A device the machine does not have is refused with the field that asked for it, never silently
replaced by the CPU: a run that was meant for a GPU and crawls on a CPU wastes hours before anyone notices.
"""

from __future__ import annotations

import threading

import torch

from cliptune.config import ConfigError


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """`auto` -> the first CUDA GPU if there is one, else the CPU; `cpu`, `cuda`, `cuda:N`, `mps` only if present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{field}: {name!r} is not a device torch knows ({err})") from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
            raise ConfigError(f"{field}: {name} but this machine has 0 CUDA devices{build}; use cpu or auto")
        if device.index is not None and device.index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
            raise ConfigError(f"{field}: {name} but this machine has {count} CUDA device{'s' * (count > 1)} ({have})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{field}: {name} but MPS (Apple GPU) is not available on this machine; use cpu or auto")
        return device
    raise ConfigError(f"{field}: {name!r}: cliptune runs on cpu, cuda, cuda:N or mps")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 autocast on a GPU that has it (fp16 on one that does not), fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far, in GiB: CUDA's allocator peak on a GPU (since the start or the last
    `PeakMemory`), else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class PeakMemory:
    """Peak memory of one phase, in GiB: `with PeakMemory(device) as peak: ...`, then `peak.gb`.

    On a GPU, CUDA's allocator peak, reset on entry. Elsewhere the process's resident set sampled
    every 5 ms: the process-wide peak `peak_memory_gb` reads there cannot be reset, so it would
    report an earlier, larger phase."""

    def __init__(self, device: torch.device):
        self.device, self.gb = device, 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        process, self._stop = psutil.Process(), threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.gb = max(self.gb, process.memory_info().rss / 2**30)
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.gb = peak_memory_gb(self.device)
        else:
            self._stop.set()
            self._thread.join()
