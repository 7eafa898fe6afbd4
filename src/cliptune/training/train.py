"""`cliptune.train(config)`: the recipe run end to end, in one call from a notebook or a script."""

from __future__ import annotations

from cliptune.config import RunConfig, UsageError
from cliptune.training.recipe import Trainer, TrainResult

__all__ = ["TrainResult", "train"]


def train(config: RunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Set up the model, data and optimizer from `config` and train. The run folder
    (`config.train.output_dir`) gets what `cliptune train` writes; the result names the adapter
    (`adapter_dir`) and holds the zero-shot vs fine-tuned metrics (`results`). `resume` continues from
    the newest good checkpoint there."""
    if not isinstance(config, RunConfig):  # a YAML path is the likeliest mistake
        raise UsageError(f"train: expected a RunConfig (cliptune.load_config(path, overrides)), "
                         f"got {type(config).__name__} {config!r}")
    trainer = Trainer(config, resume=resume, progress=progress)
    trainer.setup()
    return trainer.train()
