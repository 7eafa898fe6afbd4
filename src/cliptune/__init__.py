"""cliptune: LoRA fine-tuning, retrieval evaluation and export for CLIP-family models.

The public API, imported on first use (PEP 562): `import cliptune` costs no torch, and the ONNX
search path (`cliptune.Index`, `cliptune.OnnxEmbedder`) never imports it.

    config = cliptune.load_config("configs/coco_mini_tiny.yaml", {"model.name": "BASE"})
    result = cliptune.train(config)
    scores = cliptune.evaluate(config, adapters=[result.adapter_dir])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute). Only these modules define behaviour; this file only points at them.
_LAZY: dict[str, tuple[str, str]] = {
    "RunConfig": ("cliptune.config", "RunConfig"),
    "load_config": ("cliptune.config", "load_config"),
    "UsageError": ("cliptune.config", "UsageError"),
    "train": ("cliptune.training.train", "train"),
    "Trainer": ("cliptune.training.recipe", "Trainer"),
    "TrainResult": ("cliptune.training.train", "TrainResult"),
    "evaluate": ("cliptune.evaluation.compare", "evaluate"),
    "retrieval_metrics": ("cliptune.evaluation.metrics", "retrieval_metrics"),
    "clip_loss": ("cliptune.training.loss", "clip_loss"),
    "siglip_loss": ("cliptune.training.loss", "siglip_loss"),
    "load_model": ("cliptune.models.contrastive", "load_model"),
    "load_adapter": ("cliptune.models.lora", "load_adapter"),
    "export": ("cliptune.deploy.export", "export_model"),
    "Index": ("cliptune.deploy.index", "Index"),
    "OnnxEmbedder": ("cliptune.deploy.embedders", "OnnxEmbedder"),
    "TorchEmbedder": ("cliptune.deploy.embedders", "TorchEmbedder"),
}

# Spelled out, not derived from _LAZY, so that linters and IDEs read it (tests/test_api.py keeps the two equal).
__all__ = [
    "Index", "OnnxEmbedder", "RunConfig", "TorchEmbedder", "TrainResult", "Trainer", "UsageError", "__version__",
    "clip_loss", "evaluate", "export", "load_adapter", "load_config", "load_model", "retrieval_metrics",
    "siglip_loss", "train",
]

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on demand
    from cliptune.config import RunConfig, UsageError, load_config
    from cliptune.deploy.embedders import OnnxEmbedder, TorchEmbedder
    from cliptune.deploy.export import export_model as export
    from cliptune.deploy.index import Index
    from cliptune.evaluation.compare import evaluate
    from cliptune.evaluation.metrics import retrieval_metrics
    from cliptune.models.contrastive import load_model
    from cliptune.models.lora import load_adapter
    from cliptune.training.loss import clip_loss, siglip_loss
    from cliptune.training.recipe import Trainer
    from cliptune.training.train import TrainResult, train


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cliptune' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)  # the public names, loaded or not (not this file's own imports)
