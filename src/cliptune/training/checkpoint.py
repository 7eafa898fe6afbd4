"""Checkpoints that survive a killed machine: written atomically, verified on load, pruned.

A checkpoint is a folder `checkpoints/step-00000120/` holding the trainable weights
(safetensors), the optimizer/scheduler/scaler/RNG state (`torch.load(weights_only=True)`, so
nothing is unpickled), a JSON of counters, and a manifest of SHA-256 digests written last. It is
built in a temporary folder and renamed into place, so a crash leaves either the whole
checkpoint or none; a torn or corrupt one is detected by its manifest and the previous is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cliptune.training.stopping import TrainingError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.pt"
COUNTERS = "counters.json"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    path: Path
    weights: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    counters: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                    counters: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` under `root` atomically, then prune all but the newest `keep`.

    On any error (a full disk, say) the partial folder is removed and the previous checkpoints are
    untouched; the error is re-raised for the caller to report.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
        torch.save(trainer_state, tmp / STATE)
        (tmp / COUNTERS).write_text(json.dumps(counters, indent=2), encoding="utf-8")
        files = {name: _sha256(tmp / name) for name in (WEIGHTS, STATE, COUNTERS)}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": files}, indent=2), encoding="utf-8")
        for name in (WEIGHTS, STATE, COUNTERS, MANIFEST):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: p.name, reverse=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from err
    for name, expected in manifest.get("sha256", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"{path}: {name} does not match its checksum (torn or corrupt)")


@dataclass
class Counters:
    """How far a run got: saved in every checkpoint's counters.json, restored on resume."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    pairs_seen: int = 0
    train_seconds: float = 0.0


def training_state(optimizer: torch.optim.Optimizer, scheduler, scaler, device: torch.device) -> dict[str, Any]:
    """Everything besides the weights that a resumed run needs to continue bit-exact, the RNG (dropout's) included."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
            "scaler": scaler.state_dict() if scaler is not None else None}


def restore_training(checkpoint: Checkpoint, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     scheduler, scaler, device: torch.device) -> Counters:
    """Load `checkpoint` into the trainable `params` and the run's state; returns its counters. A checkpoint
    of other weights (the config changed) is refused."""
    unknown = set(checkpoint.weights) ^ set(params)
    if unknown:
        raise TrainingError(f"{checkpoint.path} does not match this config's trainable weights "
                            f"(e.g. {sorted(unknown)[:3]}); was the config changed?")
    with torch.no_grad():
        for name, value in checkpoint.weights.items():
            params[name].copy_(value)
    state = checkpoint.trainer_state
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    known = {f.name for f in fields(Counters)}  # counters.json also records the plan it was written under
    return Counters(**{k: v for k, v in checkpoint.counters.items() if k in known})


def load_latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped, never used."""
    for path in list_checkpoints(root):
        try:
            verify_checkpoint(path)
            return Checkpoint(
                path=path,
                weights=load_file(str(path / WEIGHTS)),
                trainer_state=torch.load(path / STATE, map_location="cpu", weights_only=True),
                counters=json.loads((path / COUNTERS).read_text(encoding="utf-8")),
            )
        # weights_only refuses a pickled object with UnpicklingError (not a RuntimeError): treat it as
        # a bad checkpoint and fall back, rather than crash the resume.
        except (CheckpointError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
            log.warning("skipping checkpoint %s: %s; trying the previous one", path.name, err)
    return None
