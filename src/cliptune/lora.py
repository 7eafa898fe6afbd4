"""Which weights train: LoRA adapters per tower (PEFT), frozen or fully trained towers, heads, temperature.

The adapter is a plain PEFT adapter: `PeftModel.from_pretrained(CLIPModel.from_pretrained(base), dir)`
loads what `save_adapter` writes. The temperature/bias, which PEFT does not save, go to a side file;
they change the loss, not the embeddings, so retrieval through plain PEFT is unchanged without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cliptune.config import ConfigError, LoraSettings
from cliptune.fast_lora import use_fast_lora
from cliptune.model import ContrastiveModel

TOWER_PREFIXES = {"vision": "vision_model", "text": "text_model"}
PROJECTIONS = {"clip": ["visual_projection", "text_projection"], "dual": ["visual_projection", "text_projection"]}
DEFAULT_TARGETS = {"clip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                   "siglip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
SCALE_FILE = "cliptune_logit_scale.safetensors"
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.Conv1d)


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        # PEFT's print_trainable_parameters format, so numbers compare with its users' logs.
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def count_parameters(module: nn.Module) -> ParameterCount:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return ParameterCount(trainable, total)


def default_targets(model: ContrastiveModel) -> dict[str, list[str]]:
    if model.family == "dual":
        return dict(model.base.lora_target_modules)
    return {"vision": DEFAULT_TARGETS[model.family], "text": DEFAULT_TARGETS[model.family]}


def lora_module_names(model: ContrastiveModel, settings: LoraSettings) -> list[str]:
    """Full names of the layers that get adapters: the target leaves inside each `lora` tower.

    Layers inside `nn.MultiheadAttention` (SigLIP's pooling head) are left out: it reads
    `out_proj.weight` directly, so an adapter there would be silently ignored.
    """
    targets = default_targets(model)
    inside_mha = {n for n, m in model.base.named_modules() if isinstance(m, nn.MultiheadAttention)}
    names = []
    for tower, prefix in TOWER_PREFIXES.items():
        if getattr(settings, tower) != "lora":
            continue
        leaves = set(settings.target_modules or targets[tower])
        for name, module in model.base.named_modules():
            if not name.startswith(prefix + ".") or name.rsplit(".", 1)[-1] not in leaves:
                continue
            if any(name.startswith(m + ".") for m in inside_mha):
                continue
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                continue  # depthwise convs: PEFT's LoRA has no grouped-conv form
            if isinstance(module, _LORA_LAYER_TYPES):
                names.append(name)
        if not any(n.startswith(prefix + ".") for n in names):
            raise ConfigError(f"lora.target_modules: none of {sorted(leaves)} is a layer of the {tower} tower "
                              f"({prefix}); {model.family} models use {targets[tower]}")
    return names


def apply_lora(model: ContrastiveModel, settings: LoraSettings) -> ParameterCount:
    """Freeze the model, then make trainable exactly what `settings` asks for. Returns the counts."""
    if settings.vision == "frozen" and settings.text == "frozen" and model.family != "dual" \
            and not (settings.train_projections or settings.train_logit_scale):
        raise ConfigError("lora: both towers frozen and nothing else trained: set lora.vision or lora.text to lora/full")
    if settings.train_projections and model.family == "siglip":
        raise ConfigError("lora.train_projections: SigLIP has no separate projection heads")
    modules_to_save = [TOWER_PREFIXES[t] for t in TOWER_PREFIXES if getattr(settings, t) == "full"]
    if settings.train_projections or model.family == "dual":
        modules_to_save += PROJECTIONS[model.family]
    targets = lora_module_names(model, settings)
    base = model.base
    for param in base.parameters():
        param.requires_grad_(False)
    if targets:
        config = peft.LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=targets,
            modules_to_save=modules_to_save or None,
            use_dora=settings.use_dora,
            use_rslora=settings.use_rslora,
            bias="none",
        )
        model.net = peft.get_peft_model(base, config)
        use_fast_lora(model.net, settings.fast_path)
    else:
        # No LoRA layer anywhere (towers frozen/full): train the chosen modules directly.
        for name, module in base.named_modules():
            if name in modules_to_save:
                module.requires_grad_(True)
    scale_params = [model.logit_scale] + ([model.logit_bias] if model.logit_bias is not None else [])
    for param in scale_params:
        param.requires_grad_(settings.train_logit_scale)
    return count_parameters(model.net)


def save_adapter(model: ContrastiveModel, out_dir: Path) -> None:
    """PEFT adapter files (adapter_config.json + adapter_model.safetensors) and the temperature."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model.net, peft.PeftModel):
        model.net.save_pretrained(str(out_dir))
    else:
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.base.named_parameters() if p.requires_grad}
        save_file(trainable, str(out_dir / "trained_modules.safetensors"))
    scales = {"logit_scale": model.logit_scale.detach().cpu().reshape(1)}
    if model.logit_bias is not None:
        scales["logit_bias"] = model.logit_bias.detach().cpu().reshape(1)
    save_file(scales, str(out_dir / SCALE_FILE))


def load_adapter(model: ContrastiveModel, adapter_dir: Path, is_trainable: bool = False) -> None:
    """Attach a saved adapter to `model` (in place), checking it was made for this base model."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ConfigError(f"adapter: folder {adapter_dir} does not exist")
    if (adapter_dir / "adapter_config.json").is_file():
        _check_adapter_targets(model, adapter_dir)
        try:
            model.net = peft.PeftModel.from_pretrained(model.base, str(adapter_dir), is_trainable=is_trainable)
        except (ValueError, RuntimeError, KeyError) as err:
            raise ConfigError(f"adapter {adapter_dir} does not fit this base model: {err}") from err
    elif (adapter_dir / "trained_modules.safetensors").is_file():
        state = load_file(str(adapter_dir / "trained_modules.safetensors"))
        missing = [k for k in state if k not in dict(model.base.named_parameters())]
        if missing:
            raise ConfigError(f"adapter {adapter_dir} does not fit this base model: unknown weights {missing[:3]}")
        model.base.load_state_dict(state, strict=False)
    else:
        raise ConfigError(f"adapter: {adapter_dir} has neither adapter_config.json nor trained_modules.safetensors")
    scale_file = adapter_dir / SCALE_FILE
    if scale_file.is_file():
        scales = load_file(str(scale_file))
        with torch.no_grad():
            model.logit_scale.copy_(scales["logit_scale"].reshape(model.logit_scale.shape))
            if model.logit_bias is not None and "logit_bias" in scales:
                model.logit_bias.copy_(scales["logit_bias"].reshape(model.logit_bias.shape))


def _check_adapter_targets(model: ContrastiveModel, adapter_dir: Path) -> None:
    """PEFT loads an adapter whose layers are missing from the model without a word (same shapes,
    other depth); refuse it instead, naming a layer the base model lacks."""
    import re

    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
    names = {name for name, _ in model.base.named_modules()}
    for key in keys:
        # base_model.model.<module path>.lora_A.weight  (or .lora_B / .lora_magnitude_vector / modules_to_save)
        module = re.sub(r"^base_model\.model\.", "", key)
        module = re.split(r"\.(lora_[A-Za-z_]+|modules_to_save)\b", module)[0]
        module = re.sub(r"\.(weight|bias)$", "", module)
        if module not in names:
            raise ConfigError(f"adapter {adapter_dir} does not fit this base model: it holds weights for "
                              f"{module!r}, which the model does not have")


def set_adapter_scale(model: ContrastiveModel, scale: float) -> None:
    """Scale every LoRA update by `scale`: 0 is zero-shot, 1 the fine-tuned model, and values between
    interpolate in weight space (WiSE-FT's idea applied to the low-rank update). With DoRA the
    magnitude vector is not interpolated, so 0 is only approximately zero-shot."""
    from peft.tuners.lora import LoraLayer

    for module in model.net.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                module.set_scale(adapter, scale)
