"""One trial of a sweep: a training run exactly as `cliptune train` makes it, then what it measured.

The run is the recipe's own (`Trainer(config).setup()`, `.train()`): zero-shot and fine-tuned
retrieval on the val split come from its end-of-run evaluation, and its folder is a normal run folder
(config.yaml, metrics.json, adapter/, report.md). With a labelled image folder the trial also measures
forgetting as `cliptune eval --classify-folder` does: zero-shot classification accuracy with "a photo
of a {}" prompts, before training (the adapted model before its first step is the base model: LoRA's
B starts at zero) and after.
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cliptune.config import RunConfig, load_config
from cliptune.config_flags import dotted_values
from cliptune.evaluation.compare import read_labelled_folder, zero_shot_accuracy
from cliptune.evaluation.metrics import METRIC_KEYS
from cliptune.evaluation.report import lower_is_better
from cliptune.runtime import PeakMemory, resolve_device
from cliptune.training.recipe import Trainer

CLASSIFICATION_KEYS = ("zeroshot_classification_accuracy", "base_zeroshot_classification_accuracy", "forgetting")


class TrialInterrupted(Exception):
    """A stop signal ended the trial's training early (its run folder holds a checkpoint)."""


def objective_names(classify: bool) -> tuple[str, ...]:
    """What a sweep can optimise: the val split's metrics of the fine-tuned model, and with a labelled
    folder its classification accuracy and the forgetting (accuracy points lost to fine-tuning)."""
    return (*METRIC_KEYS, "val_loss", *(CLASSIFICATION_KEYS[::2] if classify else ()))


def objective_direction(name: str) -> str:
    """Optuna's direction for a metric: ranks, losses and forgetting go down, the rest up."""
    return "minimize" if lower_is_better(name) or name == "forgetting" else "maximize"


@dataclass(frozen=True)
class LabelledImages:
    """A labelled image folder (one sub-folder per class), read once per sweep."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]

    @classmethod
    def read(cls, folder: Path) -> LabelledImages:
        return cls(*read_labelled_folder(Path(folder)))


@dataclass
class TrialOutcome:
    """What a finished trial measured. Stored with the trial (Optuna user attributes), so every machine
    sharing a study writes the same table."""

    trainable_parameters: int
    total_parameters: int
    train_seconds: float
    pairs_per_second: float
    peak_memory_gb: float
    metrics: dict[str, float]          # the fine-tuned model on the val split (metrics.json's "fine-tuned")
    zero_shot_metrics: dict[str, float]
    classification: dict[str, float] | None = None   # CLASSIFICATION_KEYS, with a labelled folder

    def value(self, name: str) -> float:
        """The metric `name` (an objective), from the retrieval metrics or the classification check."""
        found = {**self.metrics, **(self.classification or {})}
        if name not in found:
            raise ValueError(f"the trial measured no {name!r} (it measured {', '.join(found)})")
        return float(found[name])

    def attributes(self) -> dict[str, object]:
        return asdict(self)


def trial_config(base: RunConfig, overrides: dict[str, object], run_dir: Path) -> RunConfig:
    """The base config with a trial's settings, validated as `load_config` validates a YAML file."""
    return load_config(None, {**dotted_values(base), **overrides, "train.output_dir": str(run_dir)})


def run_trial(config: RunConfig, classify: LabelledImages | None = None, progress: bool = True) -> TrialOutcome:
    """Train and evaluate one configuration. Raises TrialInterrupted if a signal stopped it, and the
    recipe's own errors (a bad combination of settings, out of memory) for the sweep to record."""
    device = resolve_device(config.train.device)
    trainer = Trainer(config, progress=progress)
    try:
        with PeakMemory(device) as peak:
            trainer.setup()
            before = _accuracy(trainer, classify) if classify else None
            result = trainer.train()
            if result.interrupted:
                raise TrialInterrupted(f"stopped at step {result.steps} by a signal")
            after = _accuracy(trainer, classify) if classify else None
    finally:
        # The next trial builds its own model: give this one's memory back first (a GPU's above all).
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        release_freed_memory()
    if "fine-tuned" not in result.results:
        raise ValueError(f"no evaluation on the val split ({config.data.val_split!r}): it has no readable images")
    classification = None
    if before is not None and after is not None:
        classification = {"zeroshot_classification_accuracy": after, "base_zeroshot_classification_accuracy": before,
                          "forgetting": before - after}
    metrics = {k: v for k, v in result.results["fine-tuned"].items() if math.isfinite(v)}
    return TrialOutcome(
        trainable_parameters=result.parameters.trainable, total_parameters=result.parameters.total,
        train_seconds=round(result.train_seconds, 2), pairs_per_second=round(result.pairs_per_second, 3),
        peak_memory_gb=round(peak.gb, 3), metrics=metrics,
        zero_shot_metrics={k: v for k, v in result.results.get("zero-shot", {}).items() if math.isfinite(v)},
        classification=classification)


def release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc's malloc_trim). On a CPU a trial's peak
    memory is the process's resident set, and glibc keeps what an earlier trial freed: without this, every
    trial after a big one would report the big one's peak."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        pass


def _accuracy(trainer: Trainer, images: LabelledImages) -> float:
    accuracy = zero_shot_accuracy(trainer.model, trainer.preprocessing, images.paths, images.labels, images.classes,
                                  trainer.device, "a photo of a {}", trainer.precision)
    trainer.model.train()  # embedding switched it to eval mode
    return accuracy
