"""Decoding images safely and turning them into model-sized uint8 tensors.

Every odd file a real dataset holds (CMYK, 16-bit, palette with transparency, EXIF-rotated,
truncated, a decompression bomb) is either normalised to 8-bit RGB here or refused with an
`ImageError` that names the file and the reason. Normalisation by mean/std happens later, on the
training device, so workers ship compact uint8 tensors.

torch is imported only inside the two functions that make tensors: the ONNX search path decodes
images through this module and must run where torch is not installed.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageEnhance, ImageFile, ImageOps, UnidentifiedImageError

from cliptune.config import AugmentConfig

if TYPE_CHECKING:
    import torch

# Truncated JPEGs must fail loudly, not decode half-grey into the training set.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


def open_rgb(path: Path, max_pixels: int = 100_000_000, draft_size: int | None = None) -> Image.Image:
    """Decode `path` fully to an 8-bit RGB image, upright as its EXIF says.

    `draft_size` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) when the image is much larger
    than needed: several times faster, and the result is resized down anyway.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return decode_opened(image, str(path), max_pixels, draft_size)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: refused as a decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read") from None
    except OSError as err:
        raise ImageError(f"{path}: unreadable image ({err})") from None
    except (ValueError, SyntaxError) as err:
        raise ImageError(f"{path}: corrupt image ({err})") from None


def decode_opened(image: Image.Image, name: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """An opened (not yet decoded) PIL image -> 8-bit upright RGB; more than `max_pixels` is refused
    before decoding. Shared by files (`open_rgb`) and bytes (`webdataset_source.decode_image_bytes`),
    which each map PIL's errors to an ImageError naming their source."""
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
class ImageTransform:
    """Resize + crop (+ optional augmentation) to a square uint8 tensor (3, size, size)."""

    size: int
    augment: AugmentConfig | None = None

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        augment = self.augment
        if augment is not None and rng is not None and augment.random_resized_crop:
            image = _random_resized_crop(image, self.size, augment.crop_scale, rng)
        else:
            image = resize_center_crop(image, self.size)
        if augment is not None and rng is not None:
            if augment.color_jitter > 0:
                image = _color_jitter(image, augment.color_jitter, rng)
            if augment.horizontal_flip and rng.random() < 0.5:
                image = ImageOps.mirror(image)
        return pil_to_uint8_tensor(image)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIP's eval transform: shorter side to `size` (bicubic), then the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> Image.Image:
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return resize_center_crop(image, size)


def _color_jitter(image: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(enhancers)
    for enhancer in enhancers:
        image = enhancer(image).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return image


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    import torch

    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def normalize_pixels(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) normalised as the model was trained."""
    import torch

    mean_t = torch.tensor(mean, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean_t) / std_t
