"""Training augmentation of whole batches on the training device (`data.augment.on_device`).

The CPU path (`images.ImageTransform`) augments one PIL image at a time in the loader workers: a
random resized crop, colour jitter and a horizontal flip cost a worker milliseconds an image. Here
the workers only ship un-augmented uint8 squares (the image cache's rows, or photos resized to
`source_size`), and `DeviceAugment` augments the batch after its (pinned, `non_blocking`) copy to
the device, with batched torch ops:

1. random resized crop: per image a box keeping a `crop_scale` share of the square's area at a
   log-uniform aspect ratio in [3/4, 4/3], 10 draws, the model's own resize when none fits
   (`images.random_crop_box`'s rule); every box is resampled to the model input in one
   `grid_sample` over per-image affine grids, with the model's filter (bicubic or bilinear);
2. colour jitter: brightness, contrast and saturation factors uniform in
   [max(0, 1 - strength), 1 + strength], applied in a random order per image, each with
   `PIL.ImageEnhance`'s arithmetic (a blend with a black, mean-grey or greyscale image, truncated
   to 0..255: the same pixels PIL gives for the same factor);
3. horizontal flip, half the time.

Normalisation follows (`Preprocessing.normalize`, the processor's exact arithmetic), so with every
augmentation off and a source at the input size the pixels are exactly the processor's.

The random draws come from a CPU `torch.Generator`: the same seed and batch give the same output,
and the same crops, flips and factors on any device. They follow the CPU path's distributions, not
its samples: an image does not get the crop the CPU path would give it, and the crop comes from the
square, not from the strips beside it (as with the CPU path reading the cache). Two smaller
differences: `grid_sample`'s bicubic kernel is a = -0.75 (PIL's is -0.5), and it does not antialias,
which matters only where a crop is shrunk, by at most source side / input side (256 / 224 = 1.14 for
the default cache). The Trainer seeds each micro-batch's generator from (seed, step, micro-batch,
rank), so a resumed run augments as an uninterrupted one.

It is meant for GPUs: on a CPU device it was slower than the PIL path (`cliptune bench --loader-only`,
docs/speed.md), and the CPU then has the model step to run as well.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from cliptune.config import AugmentConfig
from cliptune.data.images import ImageTransform, ResizeRule

CROP_ATTEMPTS = 10  # as images.random_crop_box (and torchvision's RandomResizedCrop)
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # jitter operations, in the columns of AugmentDraws.factors

# PIL filters grid_sample has; PIL's others (Lanczos, box, Hamming) are closest to bicubic.
_GRID_MODES = {int(Image.Resampling.NEAREST): "nearest", int(Image.Resampling.BILINEAR): "bilinear"}


def source_size(image_size: int, cache_size: int | None = None) -> int:
    """Side of the un-augmented squares the loader ships: the image cache's, or input * 8 / 7
    (256 for 224, as `cliptune data cache` is advised), which leaves random crops some room."""
    return cache_size if cache_size is not None else image_size * 8 // 7


def source_transform(rule: ResizeRule, side: int) -> ImageTransform:
    """The loader's un-augmented transform: the model's resize mode, scaled to a `side` square (the
    square then stands for what the model sees, before its own crop). A cache built by
    `cliptune data cache --size side` for a CLIP-style model holds exactly these pixels."""
    return ImageTransform(side, None, ResizeRule(rule.mode, None, rule.resample))


def augment_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` (e.g. run seed, step, micro-batch, rank): stable across processes
    and Python versions, unlike hash()."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def random_crop_boxes(n: int, width: int, height: int, scale: tuple[float, float],
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`images.random_crop_box` for `n` images at once: (n, 4) int64 (left, top, right, bottom) and
    (n,) bool, False where none of the 10 draws fit (the caller then uses the model's own resize)."""
    area = width * height
    low, high = scale
    targets = area * (low + (high - low) * torch.rand(n, CROP_ATTEMPTS, generator=generator, dtype=torch.float64))
    ratios = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0])
                       * torch.rand(n, CROP_ATTEMPTS, generator=generator, dtype=torch.float64))
    widths = torch.sqrt(targets * ratios).round().long()  # round half to even, as Python's round()
    heights = torch.sqrt(targets / ratios).round().long()
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first draw that fits, as the CPU loop stops there
    w, h = widths.gather(1, first).squeeze(1), heights.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    w, h = torch.where(found, w, width), torch.where(found, h, height)
    offsets = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    # Uniform over the width - w + 1 possible offsets, as random.randint(0, width - w).
    left = (offsets[:, 0] * (width - w + 1)).floor().long().clamp(max=width - w)
    top = (offsets[:, 1] * (height - h + 1)).floor().long().clamp(max=height - h)
    return torch.stack([left, top, left + w, top + h], dim=1), found


@dataclass
class AugmentDraws:
    """One batch's random choices, on the CPU."""

    boxes: torch.Tensor  # (B, 4) float64 (left, top, right, bottom) in source pixels, resampled to the input
    flips: torch.Tensor  # (B,) bool
    factors: torch.Tensor  # (B, 3) float32 jitter factors: brightness, contrast, saturation
    order: torch.Tensor  # (B, 3) int64: each row a permutation of the three jitter operations


class DeviceAugment:
    """Batched augmentation of uint8 (B, 3, S, S) squares into uint8 (B, 3, size, size) on their device."""

    def __init__(self, augment: AugmentConfig, size: int, rule: ResizeRule | None = None):
        """`size`: the model input; `rule`: the model's resize (`Preprocessing.resize_rule`, default CLIP's)."""
        self.augment, self.size, self.rule = augment, size, rule or ResizeRule()
        self.mode = _GRID_MODES.get(int(self.rule.resample), "bicubic")

    def eval_box(self, side: int) -> tuple[float, float, float, float]:
        """The model's own resize of a `side` square (no random crop): its central side * size /
        resize_size, the part the processor's centre crop keeps (all of it when it crops nothing)."""
        kept = side * self.size / (self.rule.resize_size or self.size)
        start = (side - kept) / 2
        return start, start, start + kept, start + kept

    def draw(self, batch: int, side: int, generator: torch.Generator) -> AugmentDraws:
        """The random choices for `batch` squares of `side` pixels (a CPU generator: the same draws on any device)."""
        cfg = self.augment
        boxes = torch.tensor([self.eval_box(side)], dtype=torch.float64).repeat(batch, 1)
        if cfg.random_resized_crop:
            crops, found = random_crop_boxes(batch, side, side, cfg.crop_scale, generator)
            boxes = torch.where(found[:, None], crops.double(), boxes)
        flips = torch.rand(batch, generator=generator) < 0.5 if cfg.horizontal_flip else torch.zeros(batch, dtype=torch.bool)
        strength = cfg.color_jitter
        if strength > 0:
            low, high = max(0.0, 1 - strength), 1 + strength
            factors = low + (high - low) * torch.rand(batch, 3, generator=generator, dtype=torch.float64)
            order = torch.rand(batch, 3, generator=generator).argsort(dim=1)  # a uniform random permutation per image
        else:
            factors, order = torch.ones(batch, 3, dtype=torch.float64), torch.arange(3).repeat(batch, 1)
        return AugmentDraws(boxes, flips, factors.float(), order)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (B, 3, S, S) on any device -> augmented uint8 (B, 3, size, size) on the same device."""
        return self.apply(pixels, self.draw(len(pixels), pixels.shape[-1], generator))

    def apply(self, pixels: torch.Tensor, draws: AugmentDraws) -> torch.Tensor:
        """`pixels` augmented as `draws` say: crop + resize, colour jitter, flip (the CPU path's order)."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"DeviceAugment takes uint8 (B, 3, S, S) squares, got {pixels.dtype} {tuple(pixels.shape)}")
        side = pixels.shape[-1]
        full = torch.tensor([0.0, 0.0, side, side], dtype=torch.float64)
        identity = side == self.size and bool((draws.boxes == full).all())
        jitter = self.augment.color_jitter > 0
        out = pixels if identity else _resample(pixels, draws.boxes, self.size, self.mode)
        if jitter:
            out = _jitter(out.float(), draws.factors, draws.order)
        out = out.to(torch.uint8) if out.dtype != torch.uint8 else out.clone()
        if draws.flips.any():
            rows = torch.nonzero(draws.flips).squeeze(1).to(out.device, non_blocking=True)
            out[rows] = out[rows].flip(-1)
        return out


def _resample(pixels: torch.Tensor, boxes: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Each image's box resampled to size x size; float32 holding whole numbers 0..255, as PIL's
    resize rounds to uint8. Output pixel i samples the box at left + (i + 0.5) * width / size, as
    PIL's resize(box=...) does."""
    side = pixels.shape[-1]
    boxes = boxes.to(pixels.device, torch.float32, non_blocking=True)
    # Output pixel centres as fractions of the box, then in grid_sample's frame ([-1, 1] spans the
    # input's outer pixel edges with align_corners=False). Boxes are axis-aligned, so x depends on
    # the column only and y on the row: two (B, size) vectors, no (B, size * size) matrix product.
    centres = (torch.arange(size, device=pixels.device, dtype=torch.float32) + 0.5) / size  # (size,)
    left, top, right, bottom = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]  # (B, 1) each
    xs = (left + (right - left) * centres) * (2 / side) - 1  # (B, size)
    ys = (top + (bottom - top) * centres) * (2 / side) - 1
    grid = torch.stack([xs[:, None, :].expand(-1, size, -1), ys[:, :, None].expand(-1, -1, size)], dim=-1)
    out = F.grid_sample(pixels.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255)


def _grey(image: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): PIL's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point). In float32
    it is exact: every product and partial sum is a whole number below 2**24."""
    luma = image[:, 0:1] * 19595
    luma.add_(image[:, 1:2], alpha=38470).add_(image[:, 2:3], alpha=7471).add_(0x8000)
    return luma.mul_(1 / 65536).floor_()  # >> 16 (a power of two: exact)


def _blend_(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, image, factor), in place in `image`: degenerate + factor *
    (image - degenerate) in float32, truncated into 0..255, as its C code does."""
    return image.sub_(degenerate).mul_(factor.view(-1, 1, 1, 1)).add_(degenerate).clamp_(0, 255).floor_()


def _brightness_(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(torch.zeros((), device=image.device), image, factor)  # ImageEnhance.Brightness: towards black


def _contrast_(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # ImageEnhance.Contrast: towards the image's mean grey, rounded to a whole level: int(mean + 0.5),
    # taken in integers as floor((2 * sum + n) / 2n), exact on any device (MPS has no float64).
    total = _grey(image).to(torch.int64).sum(dim=(1, 2, 3), keepdim=True)
    n = image.shape[-1] * image.shape[-2]
    mean = torch.div(2 * total + n, 2 * n, rounding_mode="floor").float()
    return _blend_(mean, image, factor)


def _saturation_(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(_grey(image), image, factor)  # ImageEnhance.Color: towards the image's own greyscale


_JITTER = {BRIGHTNESS: _brightness_, CONTRAST: _contrast_, SATURATION: _saturation_}


def _jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Each image's three operations in its own order. Images sharing an order (one of 6) go together:
    6 groups of batched ops instead of one small op per image."""
    factors = factors.to(images.device, non_blocking=True)
    for permutation in torch.unique(order, dim=0).tolist():
        rows = torch.nonzero((order == torch.tensor(permutation)).all(dim=1)).squeeze(1)
        rows = rows.to(images.device, non_blocking=True)
        group = images[rows]  # a copy: the operations work in place on it
        for operation in permutation:
            group = _JITTER[operation](group, factors[rows, operation])
        images[rows] = group
    return images
