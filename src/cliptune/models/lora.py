"""Which weights train: LoRA adapters per tower (PEFT), frozen or fully trained towers, heads, temperature.

Every run's adapter is a plain PEFT adapter: `PeftModel.from_pretrained(CLIPModel.from_pretrained(base), dir)`
loads what `save_adapter` writes. LoRA layers are PEFT's; trained heads and fully trained towers are
PEFT `modules_to_save` (a run without any LoRA layer uses PEFT's dummy target, so it is still a
PEFT adapter). The temperature/bias, which PEFT does not save, go to a side file; they change the
loss, not the embeddings, so retrieval through plain PEFT is unchanged without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import DUMMY_TARGET_MODULES
from safetensors.torch import load_file, save_file
from torch import nn

from cliptune.config import ConfigError, LoraSettings, ModelConfig
from cliptune.data.preprocessing import Preprocessing
from cliptune.models.contrastive import ContrastiveModel, load_model
from cliptune.models.fast_lora import use_fast_lora
from cliptune.models.random_shapes import is_random_model

TOWER_PREFIXES = {"vision": "vision_model", "text": "text_model"}
PROJECTIONS = {"clip": ["visual_projection", "text_projection"], "dual": ["visual_projection", "text_projection"]}
DEFAULT_TARGETS = {"clip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                   "siglip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
SCALE_FILE = "cliptune_logit_scale.safetensors"
LEGACY_TRAINED_FILE = "trained_modules.safetensors"  # heads-only adapters written before they were PEFT
# Kept on the PeftModel for `set_adapter_scale`: the zero-shot temperature/bias (PEFT keeps the base
# copy of everything else it trains), and the fine-tuned values of what the scale interpolates.
_ZERO_SHOT_ATTR = "cliptune_zero_shot_scales"
_FINE_TUNED_ATTR = "cliptune_fine_tuned_tensors"
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
    """Parameters of the model as it computes: PEFT keeps an untouched base copy of each trained head
    or tower (`modules_to_save`), which is left out, so training the heads does not grow "all params"."""
    shadowed = {id(p) for m in module.modules() if isinstance(m, ModulesToSaveWrapper)
                for p in m.original_module.parameters()}
    params = [p for p in module.parameters() if id(p) not in shadowed]
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


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
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # Without any LoRA layer (heads only, full towers) the run is still a PEFT adapter, so plain
        # PeftModel.from_pretrained loads every run; PEFT refuses an empty target list, not its dummy.
        target_modules=targets or DUMMY_TARGET_MODULES,
        modules_to_save=modules_to_save or None,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        bias="none",
    )
    model.net = peft.get_peft_model(base, config)
    use_fast_lora(model.net, settings.fast_path)
    _remember_zero_shot_scales(model)
    scale_params = [model.logit_scale] + ([model.logit_bias] if model.logit_bias is not None else [])
    for param in scale_params:
        param.requires_grad_(settings.train_logit_scale)
    return count_parameters(model.net)


def count_adapted_parameters(model_cfg: ModelConfig, settings: LoraSettings) -> ParameterCount:
    """What `apply_lora` reports for this model and these settings, without a model to train (a dry
    run): a `random:` shape is built on the meta device, so counting ViT-L/14 or so400m takes no
    memory and seconds; a hub id or folder is loaded as training would load it."""
    model, _ = load_model(model_cfg, on_meta=is_random_model(model_cfg.name))
    return apply_lora(model, settings)


def save_adapter(model: ContrastiveModel, out_dir: Path) -> None:
    """PEFT adapter files (adapter_config.json + adapter_model.safetensors) and the temperature."""
    if not isinstance(model.net, peft.PeftModel):
        raise ValueError("save_adapter: the model has no adapter; call apply_lora or load_adapter first")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.net.save_pretrained(str(out_dir))
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
    elif (adapter_dir / LEGACY_TRAINED_FILE).is_file():
        model.net = _peft_from_legacy_weights(model, adapter_dir, is_trainable)
    else:
        raise ConfigError(f"adapter: {adapter_dir} has neither adapter_config.json nor {LEGACY_TRAINED_FILE}")
    _remember_zero_shot_scales(model)
    scale_file = adapter_dir / SCALE_FILE
    if scale_file.is_file():
        scales = load_file(str(scale_file))
        with torch.no_grad():
            model.logit_scale.copy_(scales["logit_scale"].reshape(model.logit_scale.shape))
            if model.logit_bias is not None and "logit_bias" in scales:
                model.logit_bias.copy_(scales["logit_bias"].reshape(model.logit_bias.shape))


def _peft_from_legacy_weights(model: ContrastiveModel, adapter_dir: Path, is_trainable: bool) -> peft.PeftModel:
    """Runs without LoRA layers used to save their trained tensors by model name in
    `trained_modules.safetensors`; they become the PEFT adapter such a run writes now (the same
    modules as `modules_to_save`), so scaling and merging treat old and new runs alike."""
    state = load_file(str(adapter_dir / LEGACY_TRAINED_FILE))
    known = model.base.state_dict()
    unknown = [key for key in state if key not in known]
    if unknown:
        raise ConfigError(f"adapter {adapter_dir} does not fit this base model: unknown weights {unknown[:3]}")
    # Top-level tensors (logit_scale, logit_bias) are no module's; the scale file restores them.
    modules = sorted({key.split(".", 1)[0] for key in state if "." in key})
    config = peft.LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=modules or None,
                             inference_mode=not is_trainable)
    net = peft.get_peft_model(model.base, config)
    inner = net.get_base_model()
    for name in modules:
        copy = inner.get_submodule(name).modules_to_save["default"]
        weights = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")}
        try:
            copy.load_state_dict(weights, strict=False)  # the file holds trained parameters only, no buffers
        except RuntimeError as err:
            raise ConfigError(f"adapter {adapter_dir} does not fit this base model: {err}") from err
    return net


def _check_adapter_targets(model: ContrastiveModel, adapter_dir: Path) -> None:
    """PEFT loads an adapter whose layers are missing from the model without a word (same shapes,
    other depth); refuse it instead, naming a layer or weight the base model lacks."""
    import re

    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
    modules = {name for name, _ in model.base.named_modules()}
    tensors = set(model.base.state_dict())
    for key in keys:
        name = re.sub(r"^base_model\.model\.", "", key)
        # <module>.lora_A.weight (or lora_B, lora_magnitude_vector...): the adapted module must exist.
        # Anything else is a modules_to_save tensor, saved under the base model's own name for it.
        parts = re.split(r"\.lora_[A-Za-z_]+\b", name)
        missing = parts[0] if len(parts) > 1 and parts[0] not in modules else \
            name if len(parts) == 1 and name not in tensors else None
        if missing is not None:
            raise ConfigError(f"adapter {adapter_dir} does not fit this base model: it holds weights for "
                              f"{missing!r}, which the model does not have")


def _remember_zero_shot_scales(model: ContrastiveModel) -> None:
    """Note the base model's temperature/bias before training or loading changes them: PEFT keeps
    a base copy of every module it trains, but these two are plain parameters outside its reach."""
    scales = {"logit_scale": model.logit_scale}
    if model.logit_bias is not None:
        scales["logit_bias"] = model.logit_bias
    setattr(model.net, _ZERO_SHOT_ATTR, {key: value.detach().clone() for key, value in scales.items()})


def _interpolated_tensors(model: ContrastiveModel) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(live tensor, zero-shot value, fine-tuned value) of every trained tensor that is not a LoRA
    layer's: the modules_to_save copies (heads, fully trained towers) and the temperature/bias."""
    net = model.net
    found: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name, module in net.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            zero_shot = module.original_module.state_dict(keep_vars=True)
            for adapter in module.active_adapters:
                for key, live in module.modules_to_save[adapter].state_dict(keep_vars=True).items():
                    found.append((f"{name}.{adapter}.{key}", live, zero_shot[key]))
    zero_shot_scales = getattr(net, _ZERO_SHOT_ATTR, {})
    for key, live in (("logit_scale", model.logit_scale), ("logit_bias", model.logit_bias)):
        if live is not None and key in zero_shot_scales:
            found.append((key, live, zero_shot_scales[key]))
    fine_tuned = getattr(net, _FINE_TUNED_ATTR, None)
    if fine_tuned is None:  # the first scaling: the live tensors still hold the fine-tuned values
        fine_tuned = {name: live.detach().clone() for name, live, _ in found}
        setattr(net, _FINE_TUNED_ATTR, fine_tuned)
    return [(live, zero_shot.detach(), fine_tuned[name]) for name, live, zero_shot in found]


def set_adapter_scale(model: ContrastiveModel, scale: float) -> None:
    """Move every trained weight between the base model (0) and the fine-tuned one (1), WiSE-FT's
    weight-space interpolation: each LoRA update is scaled by `scale`, and every other trained
    tensor (heads, fully trained towers, temperature) becomes base + scale * (fine-tuned - base).
    0 and 1 give the zero-shot and the fine-tuned weights exactly. With DoRA the magnitude vector
    is not interpolated, so 0 is only approximately zero-shot.

    The fine-tuned values are noted at the first call: scale a finished model, not one in training.
    """
    if not isinstance(model.net, peft.PeftModel):
        raise ValueError("set_adapter_scale: the model has no adapter; call load_adapter first")
    for module in model.net.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                module.set_scale(adapter, scale)
    with torch.no_grad():
        for live, zero_shot, fine_tuned in _interpolated_tensors(model):
            zero_shot, fine_tuned = zero_shot.to(live.device), fine_tuned.to(live.device)
            # The ends are copied, not computed: base + 1 * (tuned - base) can miss tuned by a rounding.
            if scale == 0:
                live.copy_(zero_shot)
            elif scale == 1 or not live.is_floating_point():
                live.copy_(fine_tuned)
            else:
                live.copy_(torch.lerp(zero_shot, fine_tuned, scale))


def load_merged_model(base: str, adapter: Path | None = None) -> tuple[ContrastiveModel, Preprocessing]:
    """The base model with `adapter` folded into its weights: a plain transformers model, no peft inside."""
    model, preprocessing = load_model(ModelConfig(name=str(base)))
    if adapter is not None:
        load_adapter(model, Path(adapter))
        if hasattr(model.net, "merge_and_unload"):
            # Also swaps modules_to_save copies (a dual encoder's trained heads) in for the originals.
            model.net = model.net.merge_and_unload()
    return model.eval(), preprocessing
