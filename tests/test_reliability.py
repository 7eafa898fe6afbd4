"""Runs that survive being killed: resume is bit-exact, SIGTERM checkpoints, corrupt/torn/failed
checkpoints fall back to the previous one, non-finite losses are skipped then stop the run."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder_dataset
from safetensors.torch import load_file

from cliptune.training import checkpoint as ckpt
from cliptune.training.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

# ---------------------------------------------------------------------------------------------
# A real `cliptune train` process, killed and resumed
# ---------------------------------------------------------------------------------------------


def _cli(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cliptune", "train", "--model.name", str(model_dir), "--data.path", str(data),
            "--train.output_dir", str(out), "--train.save_every", "1", "--train.max_steps", "6",
            "--train.micro_batch_size", "2", "--train.grad_accum_steps", "2", "--train.log_every", "1",
            "--data.num_workers", "0", "--train.report", "false", "--lora.dropout", "0.1", "--lora.r", "4",
            "--train.device", "cpu", "--train.keep_checkpoints", "2", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["step"], r["train_loss"]) for r in map(json.loads, lines) if "train_loss" in r]


def test_killed_and_sigtermed_run_resumes_bit_exact(tiny_clip_dir, tmp_path):
    data = make_image_folder_dataset(tmp_path / "data", n_images=12)
    reference_out, out = tmp_path / "reference", tmp_path / "interrupted"
    popen = dict(env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference = subprocess.Popen(_cli(tiny_clip_dir, data, reference_out), **popen)
    # 1: SIGKILL right after the step-2 checkpoint lands (no chance to clean up).
    run = subprocess.Popen(_cli(tiny_clip_dir, data, out), **popen)
    _wait_for(out / "checkpoints" / "step-00000002", run)
    run.kill()
    run.communicate()
    # 2: resume, then SIGTERM: the run finishes its step, checkpoints, exits 130 naming --resume.
    run = subprocess.Popen(_cli(tiny_clip_dir, data, out, "--resume"), **popen)
    _wait_for(out / "checkpoints" / "step-00000004", run)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-2000:]
    assert "--resume" in stdout + stderr
    assert "resumed from" in stderr
    stopped_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints"))
    assert stopped_at >= 4
    verify_checkpoint(out / "checkpoints" / f"step-{stopped_at:08d}")
    # 3: resume to the end.
    final = subprocess.run(_cli(tiny_clip_dir, data, out, "--resume"), **{k: v for k, v in popen.items()}, timeout=240)
    assert final.returncode == 0, final.stderr[-2000:]
    reference_stdout, reference_stderr = reference.communicate(timeout=240)
    assert reference.returncode == 0, reference_stderr[-2000:]

    assert _losses(out) == _losses(reference_out)  # bit-exact floats, every step once
    assert [s for s, _ in _losses(out)] == list(range(1, 7))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(reference_out / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert any(expected[k].abs().sum() > 0 for k in expected if "lora_B" in k)  # it did train


# ---------------------------------------------------------------------------------------------
# Checkpoint files: corrupt, torn, pruned, failed writes, pickles
# ---------------------------------------------------------------------------------------------


def _save(root: Path, step: int, keep: int = 5) -> Path:
    weights = {"w": torch.full((3,), float(step))}
    state = {"optimizer": {"lr": 0.1 * step}, "rng": {"torch": torch.get_rng_state()}}
    return save_checkpoint(root, step, weights, state, {"step": step}, keep)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    weights = newest / ckpt.WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-4:] = bytes(b ^ 0xFF for b in raw[-4:])
    weights.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        loaded = load_latest_checkpoint(tmp_path)
    assert loaded.counters["step"] == 1 and torch.equal(loaded.weights["w"], torch.full((3,), 1.0))
    assert "skipping checkpoint step-00000002" in caplog.text and "checksum" in caplog.text


def test_torn_checkpoint_without_manifest_falls_back(tmp_path, caplog):
    _save(tmp_path, 1)
    (_save(tmp_path, 2) / ckpt.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        assert load_latest_checkpoint(tmp_path).counters["step"] == 1
    assert "no manifest.json" in caplog.text


def test_pruning_keeps_only_keep_checkpoints(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000004"]


@pytest.mark.parametrize("target", ["save_file", "torch_save"])
def test_failed_save_leaves_previous_checkpoint_and_no_tmp(tmp_path, monkeypatch, target):
    _save(tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "save_file":
        monkeypatch.setattr(ckpt, "save_file", full_disk)
    else:
        monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError) as err:
        _save(tmp_path, 2)
    assert err.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    assert load_latest_checkpoint(tmp_path).counters["step"] == 1


class _Payload:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/cliptune-pwned-by-checkpoint",))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, caplog):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    torch.save({"optimizer": _Payload()}, bad / ckpt.STATE)
    manifest = json.loads((bad / ckpt.MANIFEST).read_text())
    manifest["sha256"][ckpt.STATE] = ckpt._sha256(bad / ckpt.STATE)  # a well-formed, signed-looking checkpoint
    (bad / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        loaded = load_latest_checkpoint(tmp_path)
    assert not Path("/tmp/cliptune-pwned-by-checkpoint").exists()
    assert loaded.counters["step"] == 1  # refused, and the previous good one used
    assert "skipping checkpoint step-00000002" in caplog.text


# ---------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------


def _trainer(model_dir: Path, tmp_path: Path, **train):
    from cliptune.config import load_config
    from cliptune.training.recipe import Trainer

    data = make_image_folder_dataset(tmp_path / "data", n_images=8)
    overrides = {"model.name": str(model_dir), "data.path": str(data), "data.num_workers": 0,
                 "train.output_dir": str(tmp_path / "run"), "train.device": "cpu", "train.report": False,
                 "train.micro_batch_size": 2, "train.grad_accum_steps": 1, "train.save_every": 1,
                 "train.log_every": 1, "lora.r": 2}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    trainer = Trainer(load_config(None, overrides), progress=False)
    trainer.setup()
    return trainer


def _nan_on(trainer, steps: set[int]):
    real = trainer.train_step

    def step(micro):
        loss = real(micro)
        return loss * float("nan") if trainer.step + 1 in steps else loss
    trainer.train_step = step


def _snapshot(trainer) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """Every trainable parameter and the optimizer's per-parameter state (AdamW's moments and step
    counts), copied, and the parameters still holding a gradient. The param groups' lr is left out:
    the schedule advances on a skipped step too."""
    params = {n: p.detach().clone() for n, p in trainer._trainable_state().items()}
    state = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    grads_left = [n for n, p in trainer._trainable_state().items() if p.grad is not None]
    return params, state, grads_left


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if a[key].keys() != b[key].keys():
            return False
        for name, value in a[key].items():
            other = b[key][name]
            if isinstance(value, torch.Tensor):
                if not torch.equal(value, other):
                    return False
            elif value != other:
                return False
    return True


def test_nonfinite_losses_are_skipped_and_counted(tiny_clip_dir, tmp_path):
    trainer = _trainer(tiny_clip_dir, tmp_path, max_steps=4, max_nonfinite_steps=3)
    # The NaN is forced onto the loss value only: the gradients stay finite, so a trainer that steps
    # anyway would change the weights without making them non-finite. Only a snapshot shows it.
    _nan_on(trainer, {2, 3})
    snapshots: dict[str, dict[int, tuple]] = {"before": {}, "after": {}}
    nan_step = trainer.train_step

    def train_step(micro):
        snapshots["before"][trainer.step + 1] = _snapshot(trainer)
        return nan_step(micro)

    trainer.train_step = train_step
    log_metrics = trainer.log_metrics

    def log_and_snapshot(record):
        if "train_loss" in record:  # written once the step is finished (train.log_every=1)
            snapshots["after"][record["step"]] = _snapshot(trainer)
        log_metrics(record)

    trainer.log_metrics = log_and_snapshot
    result = trainer.train()
    assert result.steps == 4 and result.skipped_steps == 2
    assert not result.interrupted
    assert sorted(snapshots["before"]) == sorted(snapshots["after"]) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        params_before, state_before, _ = snapshots["before"][step]
        params_after, state_after, grads_left = snapshots["after"][step]
        assert grads_left == [], f"step {step} left gradients behind for the next step: {grads_left[:3]}"
        changed = [n for n in params_before if not torch.equal(params_before[n], params_after[n])]
        if step in (2, 3):  # skipped: nothing the optimizer owns moves
            assert changed == [], f"step {step} was skipped but changed {changed[:3]}"
            assert _same_state(state_before, state_after), f"step {step} was skipped but the optimizer state changed"
        else:  # the good steps around them do train (so the comparison above can see a change)
            assert changed, f"step {step} changed no parameter"
            assert not _same_state(state_before, state_after)
    assert all(torch.isfinite(p).all() for p in trainer._trainable_state().values())


def test_too_many_nonfinite_losses_in_a_row_stop_with_checkpoints_intact(tiny_clip_dir, tmp_path):
    from cliptune.training.recipe import TrainingError

    trainer = _trainer(tiny_clip_dir, tmp_path, max_steps=4, max_nonfinite_steps=2)
    _nan_on(trainer, {2, 3, 4})
    with pytest.raises(TrainingError, match=r"2 non-finite losses in a row.*max_nonfinite_steps.*intact"):
        trainer.train()
    root = tmp_path / "run" / "checkpoints"
    good = load_latest_checkpoint(root)
    assert good is not None and good.counters["step"] >= 1
    for path in list_checkpoints(root):
        verify_checkpoint(path)
    assert all(torch.isfinite(w).all() for w in good.weights.values())
