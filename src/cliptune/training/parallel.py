"""Data parallelism for the recipe: the Accelerator and the device each process trains on, the DDP
wrapper, and the collectives the recipe runs beside DDP's own (the temperature's gradient, agreeing to
skip a step). In a single process each is a no-op or the identity."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import get_int_from_env

from cliptune.config import ConfigError, TrainConfig
from cliptune.models.contrastive import ContrastiveModel
from cliptune.runtime import resolve_device


def start_accelerator(config: TrainConfig, log_with: list[str | GeneralTracker]) -> tuple[Accelerator, torch.device]:
    """The run's Accelerator (with its trackers) and the device this process trains on."""
    device = resolve_device(config.device)
    # Accelerate's device matters only to a launched multi-process run (which one each rank takes, gloo
    # for CPUs); a single process uses `device`. Asking for cpu=True there would also fail once an
    # earlier Accelerator in this process chose a GPU ("AcceleratorState has already been initialized").
    launched = get_int_from_env(["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE"], 1) > 1
    # log_with=None, not []: Accelerate warns about an empty list as if trackers had gone missing.
    accelerator = Accelerator(cpu=device.type == "cpu" and launched, log_with=log_with or None)
    if accelerator.num_processes > 1:
        # Each process takes its local rank's device; one fixed index cannot serve them all.
        if device.index is not None:
            raise ConfigError(f"train.device: {config.device} names one device, but {accelerator.num_processes} "
                              f"processes share this run; use {device.type}")
        return accelerator, accelerator.device
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels and allocations without an explicit device go there too
    return accelerator, device


def wrap_ddp(model: ContrastiveModel, accelerator: Accelerator) -> torch.nn.Module:
    """`model` in DistributedDataParallel under several processes, else `model` itself."""
    if accelerator.num_processes == 1:
        return model
    # The temperature is used by the loss outside forward(); DDP must not wait for its gradient,
    # which `average_scale_grads` averages after the backward passes.
    scale_names = [n for n, p in model.named_parameters() if p is model.logit_scale or p is model.logit_bias]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, scale_names)
    return accelerator.prepare_model(model)


def average_scale_grads(model: ContrastiveModel, accelerator: Accelerator) -> None:
    """Average the temperature's (and SigLIP bias's) gradient over the processes, as DDP does the rest."""
    if accelerator.num_processes == 1:
        return
    for param in (model.logit_scale, model.logit_bias):
        if param is not None and param.requires_grad and param.grad is not None:
            param.grad.copy_(accelerator.reduce(param.grad, reduction="mean"))


def on_every_rank(condition: bool, accelerator: Accelerator, device: torch.device) -> bool:
    """True when `condition` holds on every process (each must call it)."""
    if accelerator.num_processes == 1:
        return condition
    flag = torch.tensor([1 if condition else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())
