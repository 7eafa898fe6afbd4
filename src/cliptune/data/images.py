"""Decoding images safely and turning them into the model's input exactly as its own processor does.

Every odd file a real dataset holds (CMYK, 16-bit, palette with transparency, EXIF-rotated,
truncated, a decompression bomb) is either normalised to 8-bit RGB here or refused with an
`ImageError` that names the file and the reason.

Resizing follows the model's Hugging Face image processor (the PIL one, `CLIPImageProcessorPil` /
`SiglipImageProcessorPil`) to the pixel: `ResizeRule` carries its resize rule and filter, and
`normalization_table` its rescale and mean/std arithmetic. Normalisation happens later, on the
training device, so workers ship compact uint8 tensors.

torch is imported only inside the functions that make tensors: the ONNX search path decodes
images through this module and must run where torch is not installed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageEnhance, ImageFile, ImageOps, UnidentifiedImageError

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS, AugmentConfig

if TYPE_CHECKING:
    import torch

# Truncated JPEGs must fail loudly, not decode half-grey into the training set.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# File suffixes read as images where a folder is listed (`cliptune index`, eval's --classify-folder).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

SHORTEST_EDGE_CROP = "shortest_edge_crop"  # CLIPImageProcessor: shorter side to N, then the centre square
SQUASH = "squash"  # SiglipImageProcessor: straight to size x size, aspect ratio not kept, nothing cropped
RESIZE_MODES = (SHORTEST_EDGE_CROP, SQUASH)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


# -- Pillow's own pixel limit ---------------------------------------------------------------------
# Pillow refuses images above Image.MAX_IMAGE_PIXELS (89.5M: a warning, an error at twice that) in
# Image.open, before cliptune could apply data.max_image_pixels. While cliptune decodes, Pillow's
# check is off and `decode_opened` applies the configured limit itself, before any pixel is
# decoded. The global is shared by every thread, so it is switched off once for all concurrent
# decodes (a count under a lock) and the previous value comes back when the last one finishes.
_pil_limit_lock = threading.Lock()
_pil_limit_users = 0
_pil_limit_saved: int | None = None


@contextlib.contextmanager
def own_pixel_limit() -> Iterator[None]:
    """Within this block Pillow's MAX_IMAGE_PIXELS check is off; the caller checks the size itself."""
    global _pil_limit_users, _pil_limit_saved
    with _pil_limit_lock:
        if _pil_limit_users == 0:
            _pil_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_limit_users += 1
    try:
        yield
    finally:
        with _pil_limit_lock:
            _pil_limit_users -= 1
            if _pil_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit_saved


def _reset_pil_limit_in_child() -> None:
    # A DataLoader worker forked while another thread was decoding inherits neither that thread nor
    # a usable lock: it starts with no decode in flight and Pillow's limit as the user had it.
    global _pil_limit_lock, _pil_limit_users
    if _pil_limit_users:
        Image.MAX_IMAGE_PIXELS = _pil_limit_saved
    _pil_limit_lock, _pil_limit_users = threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pil_limit_in_child)


def open_rgb(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode `path` fully to an 8-bit RGB image, upright as its EXIF says.

    `draft_size` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) when the image is much larger
    than needed: several times faster, but the pixels then differ from a full decode, so only
    augmented training and image checks use it, never the model's exact input.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    try:
        with own_pixel_limit(), Image.open(path) as image:
            return decode_opened(image, str(path), max_pixels, draft_size)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read") from None
    except OSError as err:
        raise ImageError(f"{path}: unreadable image ({err})") from None
    except (ValueError, SyntaxError) as err:
        raise ImageError(f"{path}: corrupt image ({err})") from None


def decode_opened(image: Image.Image, name: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """An opened (not yet decoded) PIL image -> 8-bit upright RGB; more than `max_pixels` is refused
    before decoding. Shared by files (`open_rgb`) and bytes (`webdataset_source.decode_image_bytes`),
    which each open the image inside `own_pixel_limit()` and map PIL's errors to an ImageError
    naming their source."""
    if image.width * image.height > max_pixels:
        raise ImageError(f"{name}: {image.width}x{image.height} pixels exceeds data.max_image_pixels="
                         f"{max_pixels} (possible decompression bomb)")
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return _to_rgb(ImageOps.exif_transpose(image))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of PIL's clipping convert.
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size else 1.0
        scale = 255.0 / (65535.0 if high > 255 else 255.0)
        return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white, as a viewer shows them, rather than black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, CMYK, YCbCr, P without transparency, 1-bit


@dataclass(frozen=True)
class ResizeRule:
    """How a decoded photo becomes the model's square input, as the model's image processor does it.

    `shortest_edge_crop` (CLIP): the shorter side to `resize_size`, the longer to
    int(resize_size * long / short) (floored, as transformers does), then the centre size x size.
    `squash` (SigLIP): straight to resize_size x resize_size, then the centre size x size (nothing
    to crop when resize_size is the size). `resize_size` None means the output size.
    """

    mode: str = SHORTEST_EDGE_CROP
    resize_size: int | None = None
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.mode!r} is not one of {', '.join(RESIZE_MODES)}")

    def at(self, size: int) -> ResizeRule:
        """The same rule with `resize_size` made explicit for an output of `size`."""
        return ResizeRule(self.mode, self.resize_size or size, self.resample)

    def apply(self, image: Image.Image, size: int) -> Image.Image:
        if self.mode == SQUASH:
            side = self.resize_size or size
            image = image.resize((side, side), self.resample)
            return image if side == size else center_crop(image, size)
        return resize_center_crop(image, size, self.resize_size, self.resample)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "resize_size": self.resize_size, "resample": self.resample}

    @classmethod
    def from_dict(cls, value: dict) -> ResizeRule:
        return cls(value.get("mode", SHORTEST_EDGE_CROP), value.get("resize_size"),
                   int(value.get("resample", Image.Resampling.BICUBIC)))


@dataclass(frozen=True)
class ImageTransform:
    """Resize (+ optional augmentation) to a square uint8 tensor (3, size, size).

    Without augmentation the pixels are exactly what the model's image processor makes before its
    rescale and normalisation (`normalize_pixels` does those, bit for bit)."""

    size: int
    augment: AugmentConfig | None = None
    rule: ResizeRule = ResizeRule()

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        augment = self.augment
        if augment is not None and rng is not None and augment.random_resized_crop:
            image = _random_resized_crop(image, self.size, augment.crop_scale, rng, self.rule)
        else:
            image = self.rule.apply(image, self.size)
        if augment is not None and rng is not None:
            if augment.color_jitter > 0:
                image = _color_jitter(image, augment.color_jitter, rng)
            if augment.horizontal_flip and rng.random() < 0.5:
                image = ImageOps.mirror(image)
        return pil_to_uint8_tensor(image)


def resize_center_crop(image: Image.Image, size: int, shortest_edge: int | None = None,
                       resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """CLIPImageProcessor's resize and centre crop: the shorter side to `shortest_edge` (default
    `size`), the longer to int(shortest_edge * long / short), then the centre size x size.

    The longer side is floored, not rounded, and no `reducing_gap` is used, exactly as
    transformers' `get_resize_output_image_size` and `image_transforms.resize` do: rounding
    shifts the centre crop by a pixel on most 640x480 and 640x427 photos.
    """
    edge = shortest_edge or size
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    new_w, new_h = (edge, new_long) if width <= height else (new_long, edge)
    return center_crop(image.resize((new_w, new_h), resample), size)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre size x size, offsets floored as transformers' `center_crop`; an image smaller
    than that is padded with black on both sides, as it does (PIL fills outside the image with 0)."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_crop_box(width: int, height: int, scale: tuple[float, float],
                    rng: random.Random) -> tuple[int, int, int, int] | None:
    """A random (left, top, right, bottom) box keeping a `scale` share of the area at an aspect ratio
    within [3/4, 4/3] (torchvision's RandomResizedCrop rule), or None after 10 draws that do not fit."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return None


def _random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random,
                         rule: ResizeRule) -> Image.Image:
    box = random_crop_box(image.width, image.height, scale, rng)
    if box is None:
        # No crop fits (an extreme aspect ratio): the model's own eval resize, not CLIP's for every model.
        return rule.apply(image, size)
    return image.resize((size, size), rule.resample, box=box)


def _color_jitter(image: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(enhancers)
    for enhancer in enhancers:
        image = enhancer(image).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return image


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    import torch

    # numpy makes the channels-first copy: torch's threaded permute copy of a small uint8 image is
    # several times slower, worst on a busy CPU.
    array = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))  # (3, H, W)
    return torch.from_numpy(array)


@functools.lru_cache(maxsize=16)
def normalization_table(mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float) -> np.ndarray:
    """(3, 256) float32: the model input value of each uint8 value in each channel.

    Computed with transformers' own arithmetic: `image_transforms.rescale` multiplies in float64 and
    casts to float32, then `normalize` takes (x - mean) / std in float32. A table of those 768
    numbers makes the device-side normalisation bit-identical to the processor on any device.
    """
    rescaled = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)  # (256,)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(3, 1)
    table = (rescaled[None, :] - mean32) / std32  # (3, 256) float32
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def normalize_array(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float],
                    rescale_factor: float = 1 / 255) -> np.ndarray:
    """numpy uint8 (B, 3, H, W) -> float32 (B, 3, H, W), as `normalize_pixels` (the torch-free path)."""
    table = normalization_table(tuple(mean), tuple(std), float(rescale_factor))
    return np.stack([table[c][pixels[:, c]] for c in range(3)], axis=1)


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     rescale_factor: float = 1 / 255) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W), exactly the processor's rescale + normalisation."""
    import torch

    table = torch.from_numpy(normalization_table(tuple(mean), tuple(std), float(rescale_factor)).copy())
    table = table.to(pixels.device)  # (3, 256)
    out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
    for c in range(3):  # a lookup per channel: index_select is the fastest gather on CPU and GPU alike
        index = pixels[:, c].reshape(-1).int()
        out[:, c] = torch.index_select(table[c], 0, index).view(pixels.shape[0], *pixels.shape[2:])
    return out
