"""Typed run configuration: what to adapt (`model`, `lora`), on what (`data`), and how (`train`).

YAML files mirror these dataclasses section by section, and any key can be overridden with a
dotted path (`train.lr=5e-5`, or `--train.lr 5e-5` on the command line). Every key and value is
checked when the config is loaded, so a typo fails in the first second, naming the field, and
never an hour into training.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class UsageError(ValueError):
    """Input the user can correct (a flag, a value, a path), named in a one-line message; the CLI exits 2."""


class ConfigError(UsageError):
    """A config key or value that cannot be used; the message names it."""


TowerMode = Literal["lora", "frozen", "full"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "none"]  # train.report_to

# data.max_image_pixels' default, also for callers without a config (search, the cache, shard tools).
# Here rather than in data/images.py: images.py imports this module, and `import cliptune.config` stays free of PIL.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


@dataclass
class ModelConfig:
    name: str = "openai/clip-vit-base-patch32"
    """Hugging Face hub id or local folder, loaded with `from_pretrained`. `random:clip-vit-b-32` (and
    `random:clip-vit-b-16`, `-l-14`, `-l-14-336`, `random:siglip-base-patch16-224`, `-so400m-patch14-384`)
    builds that checkpoint's exact architecture with random weights, offline (parameter counts, benchmarks)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off: a model folder should not execute anything."""


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch input. 0.1 is the seed recipe's."""
    fast_path: bool = True
    """On CPUs, LoRA dropout masks drawn 4 entries per random number (p quantised to 1/65536) and the
    LoRA branch fused into the base layer's matmul (`cliptune.models.fast_lora`). Off: PEFT's own modules."""
    target_modules: list[str] | None = None
    """Leaf module names to adapt in each LoRA tower. None: the model family's attention + MLP layers
    (q_proj k_proj v_proj out_proj fc1 fc2 for CLIP and SigLIP)."""
    vision: TowerMode = "lora"
    """Vision tower: `lora` (adapters), `frozen` (untouched), or `full` (every weight trained)."""
    text: TowerMode = "lora"
    """Text tower: `lora`, `frozen`, or `full`."""
    use_dora: bool = False
    """Weight-decomposed LoRA (PEFT's DoRA)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (PEFT's rsLoRA)."""
    train_logit_scale: bool = False
    """Also learn the temperature (and SigLIP's bias). Off: the pretrained temperature is kept."""
    train_projections: bool = False
    """Also train the projection heads fully. Always on for a composed dual encoder, whose heads start random."""


@dataclass
class AugmentConfig:
    random_resized_crop: bool = False
    """Crop a random area (`crop_scale` of the image) and aspect ratio, then resize to the model input."""
    crop_scale: tuple[float, float] = (0.8, 1.0)
    """Fraction of the image area a random crop keeps."""
    color_jitter: float = 0.0
    """Strength of random brightness / contrast / saturation changes (0 = off, 0.4 = strong)."""
    horizontal_flip: bool = False
    """Off by default: captions say "left" and "right", and a flip makes them false."""
    on_device: bool = False
    """Run the augmentation above on the training device, batched (`cliptune.data.device_augment`),
    instead of image by image with PIL in the loader workers: the workers then only ship uint8 squares
    (the image cache's rows, or photos resized to input * 8/7), so one worker feeds many more pairs/s.
    Crops, flips and jitter follow the CPU path's distributions, not its samples. Without any
    augmentation on it changes nothing."""

    @property
    def enabled(self) -> bool:
        """Any augmentation asked for."""
        return self.random_resized_crop or self.color_jitter > 0 or self.horizontal_flip


@dataclass
class DataConfig:
    path: str = ""
    """Annotation source: a Karpathy split JSON, a COCO captions JSON (`{split}` is replaced by the
    split name), the Flickr30k CSV, a CSV/JSONL of image + captions, or WebDataset shards
    (`shards/{split}-{000000..000099}.tar`: training streams them, validation extracts its split once)."""
    format: Literal["auto", "karpathy", "coco", "flickr30k_csv", "csv", "jsonl", "webdataset"] = "auto"
    """Annotation format; `auto` decides from the file."""
    image_root: str | None = None
    """Folder the image paths are relative to (`{split}` is replaced). Default: next to the annotations."""
    train_split: str = "train"
    """Split name training reads."""
    val_split: str = "val"
    """Split name validation reads (and `cliptune eval` / `export` score by default)."""
    test_split: str = "test"
    """Split name of the held-out test set (cached by `cliptune data cache`)."""
    captions: Literal["sample", "all"] = "sample"
    """`sample`: each epoch draws one caption per image (an epoch = one pass over the images);
    `all`: every image-caption pair once per epoch."""
    max_images: int | None = None
    """Use only the first N images of each split (quick runs)."""
    bad_images: Literal["skip", "fail"] = "skip"
    """An unreadable image is skipped, counted and listed in the report, or stops the run naming it."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images with more pixels are refused as decompression bombs."""
    num_workers: int = 2
    """DataLoader worker processes decoding images."""
    cache_dir: str | None = None
    """Image cache written by `cliptune data cache`; read instead of the JPEGs when set."""
    shuffle_buffer: int = 1000
    """WebDataset shards only: pairs held in the streaming shuffle buffer (on top of shard order)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-time image augmentation."""

    @property
    def streams_shards(self) -> bool:
        """data.path names WebDataset shards, which training streams instead of listing."""
        return self.format == "webdataset" or (self.format == "auto" and ".tar" in Path(self.path).name.lower())


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Where the config, metrics, checkpoints, adapter and report are written."""
    epochs: int = 3
    """Passes over the training images."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    micro_batch_size: int = 8
    """Pairs encoded at once: sets activation memory."""
    grad_accum_steps: int = 4
    """Micro-batches per optimizer step; the effective batch is micro_batch_size * grad_accum_steps."""
    accumulation: Literal["exact", "plain"] = "exact"
    """`exact`: the loss sees the whole effective batch as negatives (GradCache); `plain`: each
    micro-batch is its own contrastive problem (the seed notebook's way)."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay. 0: LoRA factors are small already, and HF Trainer's default is 0."""
    warmup_ratio: float = 0.05
    """Fraction of the optimizer steps spent ramping the lr up linearly (from lr / (warmup steps + 1), never 0)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm; None disables clipping."""
    loss: Literal["auto", "clip", "siglip"] = "auto"
    """`auto`: sigmoid loss for SigLIP models, symmetric InfoNCE otherwise."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 autocast on a GPU that supports it, fp32 on CPU."""
    device: str = "auto"
    """`auto` (the first CUDA GPU if there is one, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`.
    A device this machine does not have is refused, never replaced by the CPU."""
    seed: int = 0
    """Seeds weights of new layers, data order, caption draws, augmentation and dropout."""
    eval_every: int = 0
    """Validation loss (and R@K) every N optimizer steps; 0 = only at the end."""
    save_every: int = 500
    """Checkpoint every N optimizer steps (0 = only at the end and on interruption)."""
    keep_checkpoints: int = 2
    """Keep the last N checkpoints; older ones are pruned."""
    log_every: int = 10
    """Write train loss / lr / pairs/s to metrics.jsonl every N optimizer steps."""
    max_nonfinite_steps: int = 5
    """Skip steps with a NaN/inf loss; this many in a row stop the run (last good checkpoint kept)."""
    gradient_checkpointing: bool = False
    """Recompute tower activations in the backward pass: less memory, about a third more compute."""
    eval_batch_size: int = 64
    """Images or captions encoded at once without gradients (evaluation, `cliptune index`, `export`'s int8 check)."""
    report: bool = True
    """Evaluate zero-shot and fine-tuned retrieval on the val split and write report.md/.html at the end."""
    report_to: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that mirror metrics.jsonl (through Accelerate): `tensorboard` (into
    output_dir/tensorboard), `wandb`, `mlflow`, several as a list, or `none`. wandb or mlflow without its
    package is refused before the model loads; without tensorboard (the `report` extra) a warning says so."""

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """What to adapt."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """How each tower is adapted."""
    data: DataConfig = field(default_factory=DataConfig)
    """On what."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """How: optimisation, device, checkpoints, evaluation."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- loading and validation -------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or start from the defaults), apply dotted overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train)")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    config = build_dataclass(RunConfig, raw, where="")
    validate_config(config)
    return config


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A config file, or a config shipped with cliptune (src/cliptune/configs/) named `configs/NAME.yaml`
    or `NAME.yaml` when no such file is here: the README's `--config configs/...` commands then work
    from any folder and from an installed wheel. A file of that name in the working folder wins."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")) and (PACKAGED_CONFIGS / path.name).is_file():
        return PACKAGED_CONFIGS / path.name
    shipped = ", ".join(sorted(f"configs/{p.name}" for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (configs shipped with cliptune: {shipped})")


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(_plain(config.to_dict()), sort_keys=False), encoding="utf-8")


def _plain(value: Any) -> Any:
    # YAML has no tuples; lists read back into tuple fields fine.
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and converting/checking types."""
    label = where or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            full = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}{hint}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def validate_config(config: RunConfig) -> None:
    """Refuse values no run can use, naming the field."""
    lora, data, train = config.lora, config.data, config.train

    def need(ok: bool, name: str, value: Any, why: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: {value!r} {why}")

    need(bool(config.model.name.strip()), "model.name", config.model.name, "must name a model")
    need(lora.r >= 1, "lora.r", lora.r, "must be >= 1")
    need(lora.alpha > 0, "lora.alpha", lora.alpha, "must be > 0")
    need(0.0 <= lora.dropout < 1.0, "lora.dropout", lora.dropout, "must be in [0, 1)")
    need(lora.target_modules is None or len(lora.target_modules) > 0, "lora.target_modules",
         lora.target_modules, "must list at least one module name (or be null for the defaults)")
    low, high = data.augment.crop_scale
    need(0.0 < low <= high <= 1.0, "data.augment.crop_scale", data.augment.crop_scale, "must satisfy 0 < low <= high <= 1")
    need(data.augment.color_jitter >= 0, "data.augment.color_jitter", data.augment.color_jitter, "must be >= 0")
    need(data.max_images is None or data.max_images >= 1, "data.max_images", data.max_images, "must be >= 1")
    need(data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0")
    need(data.shuffle_buffer >= 1, "data.shuffle_buffer", data.shuffle_buffer, "must be >= 1")
    need(not (data.streams_shards and data.cache_dir), "data.cache_dir", data.cache_dir,
         "cannot be used with WebDataset shards (the cache is keyed by image file); stream the shards without it")
    need(data.max_image_pixels >= 1, "data.max_image_pixels", data.max_image_pixels, "must be >= 1")
    need(train.epochs >= 1, "train.epochs", train.epochs, "must be >= 1")
    need(train.max_steps is None or train.max_steps >= 1, "train.max_steps", train.max_steps, "must be >= 1")
    need(train.micro_batch_size >= 1, "train.micro_batch_size", train.micro_batch_size, "must be >= 1")
    need(train.grad_accum_steps >= 1, "train.grad_accum_steps", train.grad_accum_steps, "must be >= 1")
    need(train.lr > 0, "train.lr", train.lr, "must be > 0")
    need(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
    need(0.0 <= train.warmup_ratio < 1.0, "train.warmup_ratio", train.warmup_ratio, "must be in [0, 1)")
    need(train.max_grad_norm is None or train.max_grad_norm > 0, "train.max_grad_norm", train.max_grad_norm, "must be > 0 or null")
    for name in ("eval_every", "save_every", "log_every"):
        need(getattr(train, name) >= 0, f"train.{name}", getattr(train, name), "must be >= 0")
    need(train.keep_checkpoints >= 1, "train.keep_checkpoints", train.keep_checkpoints, "must be >= 1")
    need(train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", train.max_nonfinite_steps, "must be >= 1")
    need(train.eval_batch_size >= 1, "train.eval_batch_size", train.eval_batch_size, "must be >= 1")
    need("none" not in train.report_to or len(train.report_to) == 1, "train.report_to", train.report_to,
         "lists none beside a tracker: use none alone (metrics.jsonl only) or leave it out")
    need(DEVICE_PATTERN.fullmatch(train.device) is not None, "train.device", train.device,
         "is not a device: use auto, cpu, cuda, cuda:N or mps")


# Checked without importing torch (config loading stays light); `cliptune.runtime.resolve_device` then
# refuses a well-formed device this machine does not have.
DEVICE_PATTERN = re.compile(r"auto|cpu|(cuda|mps)(:\d+)?")
