"""Training augmentation (images.py): random resized crop, horizontal flip, colour jitter, and seeding."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from cliptune.config import AugmentConfig
from cliptune.data import images
from cliptune.data.batches import PairDataset, TokenizedCaptions
from cliptune.data.images import ImageTransform, pil_to_uint8_tensor, random_crop_box, resize_center_crop
from cliptune.data.readers import ImageCaptions


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Every pixel differs from its neighbours, so any change of crop, flip or colour shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width, height", [(640, 480), (427, 640), (500, 500)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 0.9)])
def test_crop_box_keeps_a_crop_scale_share_at_an_aspect_ratio_within_3_4_to_4_3(width, height, scale):
    rng = random.Random(f"{width}x{height}:{scale}")
    low, high = scale
    area = width * height
    fractions, ratios = [], []
    for _ in range(2000):
        box = random_crop_box(width, height, scale, rng)
        if box is None:
            continue
        left, top, right, bottom = box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, box
        w, h = right - left, bottom - top
        # The drawn sides are real numbers rounded to whole pixels: each moved by at most half a pixel.
        assert (w - 0.5) * (h - 0.5) <= high * area + 1e-9, (box, w * h / area)
        assert (w + 0.5) * (h + 0.5) >= low * area - 1e-9, (box, w * h / area)
        assert (w - 0.5) / (h + 0.5) <= 4 / 3 + 1e-12, box
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 - 1e-12, box
        fractions.append(w * h / area)
        ratios.append(w / h)
    assert len(fractions) >= 1900  # these shapes rarely need the centre-crop fallback
    # The draws cover the whole range, not one corner of it (a crop that ignored the scale would pass the above).
    # A crop of aspect ratio within [3/4, 4/3] cannot keep more than this of a 427x640 photo.
    reachable = min(high, 1.0, 4 * width / (3 * height), 4 * height / (3 * width))
    span = reachable - low
    assert min(fractions) < low + 0.05 * span and max(fractions) > reachable - 0.1 * span, (min(fractions),
                                                                                           max(fractions))
    assert min(ratios) < 0.8 and max(ratios) > 1.25, (min(ratios), max(ratios))


def test_random_resized_crop_resizes_the_drawn_box():
    image = _noise(200, 150)
    transform = ImageTransform(32, AugmentConfig(random_resized_crop=True, crop_scale=(0.3, 0.6)))
    for seed in range(5):
        box = random_crop_box(200, 150, (0.3, 0.6), random.Random(seed))
        assert box is not None
        expected = pil_to_uint8_tensor(image.resize((32, 32), Image.Resampling.BICUBIC, box=box))
        assert torch.equal(transform(image, random.Random(seed)), expected), seed


def test_a_crop_that_cannot_fit_falls_back_to_the_centre_crop():
    image = _noise(400, 8)  # 50:1: no crop with an aspect ratio of at most 4:3 keeps 90% of it
    assert random_crop_box(400, 8, (0.9, 1.0), random.Random(0)) is None
    transform = ImageTransform(16, AugmentConfig(random_resized_crop=True, crop_scale=(0.9, 1.0)))
    assert torch.equal(transform(image, random.Random(0)), pil_to_uint8_tensor(resize_center_crop(image, 16)))


def test_a_siglip_crop_uses_its_own_filter_and_falls_back_to_its_squash():
    """SigLIP resizes bilinearly without a crop: augmented crops and the no-fit fallback follow the
    model's rule, not CLIP's bicubic shortest-edge crop."""
    rule = images.ResizeRule(images.SQUASH, None, int(Image.Resampling.BILINEAR))
    transform = ImageTransform(16, AugmentConfig(random_resized_crop=True, crop_scale=(0.9, 1.0)), rule)
    narrow = _noise(400, 8)
    assert torch.equal(transform(narrow, random.Random(0)), pil_to_uint8_tensor(rule.apply(narrow, 16)))
    assert not torch.equal(transform(narrow, random.Random(0)), pil_to_uint8_tensor(resize_center_crop(narrow, 16)))
    image = _noise(200, 150)
    box = random_crop_box(200, 150, (0.9, 1.0), random.Random(3))
    assert box is not None
    expected = pil_to_uint8_tensor(image.resize((16, 16), Image.Resampling.BILINEAR, box=box))
    assert torch.equal(transform(image, random.Random(3)), expected)


def test_horizontal_flip_happens_half_the_time_and_mirrors_the_image():
    image = _noise(32, 32)
    plain = ImageTransform(32)(image)
    mirrored = plain.flip(-1)
    transform = ImageTransform(32, AugmentConfig(horizontal_flip=True))
    n, flips = 1000, 0
    for seed in range(n):
        out = transform(image, random.Random(seed))
        assert torch.equal(out, plain) or torch.equal(out, mirrored), seed
        flips += torch.equal(out, mirrored)
    # Binomial(1000, 0.5): standard deviation 15.8; 4 of them either side. The seeds are fixed, so
    # this never flakes: it fails only when the rate is wrong.
    assert abs(flips - n / 2) <= 4 * math.sqrt(n * 0.25), flips
    off = ImageTransform(32, AugmentConfig(horizontal_flip=False, color_jitter=0.0))
    assert all(torch.equal(off(image, random.Random(seed)), plain) for seed in range(50))


@pytest.mark.parametrize("strength", [0.4, 1.5])
def test_colour_jitter_factors_lie_within_one_plus_minus_strength(monkeypatch, strength):
    calls: list[tuple[str, float]] = []

    def recording(kind):
        class Recording(kind):
            def enhance(self, factor):
                calls.append((kind.__name__, factor))
                return super().enhance(factor)
        return Recording

    monkeypatch.setattr(images, "ImageEnhance", SimpleNamespace(
        Brightness=recording(ImageEnhance.Brightness), Contrast=recording(ImageEnhance.Contrast),
        Color=recording(ImageEnhance.Color)))
    image = _noise(16, 16)
    transform = ImageTransform(16, AugmentConfig(color_jitter=strength))
    plain = ImageTransform(16)(image)
    n, changed = 300, 0
    for seed in range(n):
        start = len(calls)
        changed += not torch.equal(transform(image, random.Random(seed)), plain)
        assert sorted(kind for kind, _ in calls[start:]) == ["Brightness", "Color", "Contrast"]
    low, high = max(0.0, 1 - strength), 1 + strength
    factors = [factor for _, factor in calls]
    assert all(low <= f <= high for f in factors), (min(factors), max(factors))
    span = high - low
    assert min(factors) < low + 0.05 * span and max(factors) > high - 0.05 * span
    assert changed == n  # every draw moves the colours


def test_same_seed_gives_the_same_augmented_pixels(tmp_path):
    augment = AugmentConfig(random_resized_crop=True, crop_scale=(0.5, 1.0), color_jitter=0.4, horizontal_flip=True)
    transform = ImageTransform(24, augment)
    image = _noise(90, 60)
    outputs = [transform(image, random.Random(seed)) for seed in range(8)]
    assert all(torch.equal(out, transform(image, random.Random(seed))) for seed, out in enumerate(outputs))
    assert len({out.numpy().tobytes() for out in outputs}) == len(outputs)  # other seeds, other pixels
    # Through the dataset: a pure function of (seed, epoch, image), whichever worker asks.
    path = tmp_path / "photo.png"
    image.save(path)
    records = [ImageCaptions("0", path, ("a photo",))]
    captions = TokenizedCaptions([[[1, 2, 3]]], truncated=0, pad_token_id=0, max_length=8, pad_to_max_length=False)

    def pixels(seed: int, epoch: int) -> torch.Tensor:
        return PairDataset(records, captions, transform, seed, max_pixels=10**8)[(epoch, 0, 0)]["pixels"]

    assert torch.equal(pixels(0, 0), pixels(0, 0))
    assert not torch.equal(pixels(0, 0), pixels(0, 1))
    assert not torch.equal(pixels(0, 0), pixels(1, 0))
