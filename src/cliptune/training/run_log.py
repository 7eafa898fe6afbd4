"""The run's log: metrics.jsonl, one JSON record per line, mirrored to the experiment trackers named by
`train.report_to` (TensorBoard by default; wandb, mlflow) through Accelerate's tracker API.

metrics.jsonl is the run's own record: the report's curves read it, and a resumed run first drops
the records written after its checkpoint, so every step appears once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from cliptune.config import ConfigError, RunConfig, TrainConfig
from cliptune.extras import missing

log = logging.getLogger(__name__)

_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
PROJECT = "cliptune"  # the wandb project and the mlflow experiment


def trackers(config: TrainConfig) -> list[str | GeneralTracker]:
    """Accelerate's `log_with` for `train.report_to`. wandb or mlflow asked for but not installed is
    refused here, before anything loads (Accelerate itself would leave it out without a word)."""
    chosen = []
    for name in dict.fromkeys(config.report_to):
        if name == "none":
            continue
        if _AVAILABLE[name]():
            chosen.append(name)
        elif name == "tensorboard":  # the default: a base install (no `report` extra) still trains
            log.warning("no TensorBoard logging: %s", missing("tensorboard", "report", "train.report_to: tensorboard"))
        else:
            raise ConfigError(f"train.report_to: {name} is not installed: pip install {name} "
                              f"(or leave {name} out of train.report_to)")
    # TensorBoard writes into output_dir/tensorboard itself, not into a folder named after the project.
    return [TensorBoardTracker("tensorboard", config.output_dir) if name == "tensorboard" else name for name in chosen]


class RunLog:
    """Writes on the main process only; the trackers are the `accelerator`'s (`Accelerator(log_with=trackers(...))`)."""

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"

    def start(self, config: RunConfig) -> None:
        """Open the trackers, with the config as the run's hyper-parameters."""
        run = Path(config.train.output_dir).name
        self.accelerator.init_trackers(PROJECT, config=_flat(config.to_dict()),
                                       init_kwargs={"wandb": {"name": run}, "mlflow": {"run_name": run}})

    def truncate(self, step: int) -> None:
        """Drop records written after step `step` (the checkpoint a run resumes from): they will be written again."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` (it has a "step") to metrics.jsonl; its numbers go to the trackers too."""
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(numbers, step=record["step"])

    def history(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def close(self) -> None:
        # Not Accelerator.end_training: it also destroys the process group, which belongs to whoever
        # launched the run (and outlives train(): a caller may still gather after it).
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-4}}` -> `{"train.lr": 1e-4}`; lists as text: trackers take scalars only."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value) if isinstance(value, (list, tuple)) else value
    return flat
