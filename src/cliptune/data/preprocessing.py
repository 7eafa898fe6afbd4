"""`Preprocessing`: what turns a photo and a caption into a model's inputs, exactly as the model's
own image processor and tokenizer do. Models produce it (`models.contrastive.load_model`); the data
pipeline, evaluation and export consume it, so it lives on the data floor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cliptune.data.images import SHORTEST_EDGE_CROP, ImageTransform, ResizeRule, normalize_pixels

if TYPE_CHECKING:
    import torch
    import transformers


@dataclass(frozen=True)
class Preprocessing:
    """What turns a photo and a caption into model inputs: the model's own image processor settings
    (read from its preprocessor_config.json) and its tokenizer."""

    image_size: int
    """Square side fed to the model: the processor's crop_size (CLIP) or size (SigLIP)."""
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    tokenizer: transformers.PreTrainedTokenizerBase
    max_text_length: int
    pad_to_max_length: bool
    """SigLIP pools the last position of the sequence, so its captions must be padded to the
    length it was trained with; CLIP pools at the EOS token and can pad to the batch's longest."""
    resize_mode: str = SHORTEST_EDGE_CROP
    """`shortest_edge_crop` (CLIP: shorter side to resize_size, then the centre crop) or `squash`
    (SigLIP: straight to resize_size x resize_size, aspect ratio not kept)."""
    resize_size: int | None = None
    """The processor's size: shortest_edge, or the squashed side; None means image_size."""
    resample: int = 3
    """PIL resampling filter of the processor's resize (3 = bicubic)."""
    rescale_factor: float = 1 / 255
    """uint8 -> float scale before mean/std (1.0 when the processor does not rescale)."""

    @property
    def resize_rule(self) -> ResizeRule:
        return ResizeRule(self.resize_mode, self.resize_size, self.resample)

    def image_transform(self, augment=None) -> ImageTransform:
        """The uint8 transform; without `augment` its pixels are exactly the processor's."""
        return ImageTransform(self.image_size, augment, self.resize_rule)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) on any device -> float32 model input, bit-identical to the processor's."""
        return normalize_pixels(pixels, self.image_mean, self.image_std, self.rescale_factor)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding="max_length" if self.pad_to_max_length else "longest",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
