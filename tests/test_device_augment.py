"""Device-side augmentation (data/device_augment.py): the same distributions as the CPU path
(images.py, tests/test_augment.py), PIL's own pixel arithmetic, seeding, and a training run with it."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from cliptune.config import AugmentConfig, load_config
from cliptune.data.device_augment import (
    BRIGHTNESS,
    CONTRAST,
    SATURATION,
    AugmentDraws,
    DeviceAugment,
    augment_seed,
    random_crop_boxes,
    source_size,
    source_transform,
)
from cliptune.data.images import SQUASH, ResizeRule, pil_to_uint8_tensor, random_crop_box
from cliptune.data.preprocessing import Preprocessing
from cliptune.training.accumulation import MicroBatch

BILINEAR = int(Image.Resampling.BILINEAR)


def _noise(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    """uint8 (B, 3, side, side): every pixel differs from its neighbours, so any crop, flip or colour change shows."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (batch, 3, side, side), dtype=np.uint8))


def _smooth(side: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image (low-frequency gradients): resampling filters agree on it to a level or two."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    channels = [127 + 100 * np.sin(2 * math.pi * (rng.uniform(0.3, 1.0) * x + rng.uniform(0.3, 1.0) * y + rng.uniform()))
                for _ in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).round().astype(np.uint8))


def _as_batch(image: Image.Image) -> torch.Tensor:
    return pil_to_uint8_tensor(image)[None]


def _draws(boxes, flips=None, factors=None, order=None) -> AugmentDraws:
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    n = len(boxes)
    return AugmentDraws(boxes, torch.zeros(n, dtype=torch.bool) if flips is None else torch.as_tensor(flips),
                        torch.ones(n, 3) if factors is None else torch.as_tensor(factors, dtype=torch.float32),
                        torch.arange(3).repeat(n, 1) if order is None else torch.as_tensor(order))


# -- distributions against the CPU path ---------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(640, 480), (427, 640), (256, 256)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 0.9)])
def test_crop_boxes_follow_the_cpu_rule_and_distribution(width, height, scale):
    n = 3000
    boxes, found = random_crop_boxes(n, width, height, scale, torch.Generator().manual_seed(0))
    rng = random.Random(f"{width}x{height}:{scale}")
    cpu = [random_crop_box(width, height, scale, rng) for _ in range(n)]

    def stats(rows):
        w = np.array([r[2] - r[0] for r in rows], dtype=float)
        h = np.array([r[3] - r[1] for r in rows], dtype=float)
        free_x = np.array([width - (r[2] - r[0]) for r in rows], dtype=float)
        lefts = np.array([r[0] for r in rows], dtype=float)
        placed = free_x > 0
        return w * h / (width * height), np.log(w / h), lefts[placed] / free_x[placed]

    device_rows = boxes[found].tolist()
    cpu_rows = [b for b in cpu if b is not None]
    for left, top, right, bottom in device_rows:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        # The drawn sides are real numbers rounded to whole pixels, as on the CPU: each moved by at most half a pixel.
        assert (w - 0.5) * (h - 0.5) <= scale[1] * width * height + 1e-9
        assert (w + 0.5) * (h + 0.5) >= scale[0] * width * height - 1e-9
        assert (w - 0.5) / (h + 0.5) <= 4 / 3 + 1e-12 and (w + 0.5) / (h - 0.5) >= 3 / 4 - 1e-12
    # How often no crop fits (the model's own resize instead): binomial, 4 standard deviations.
    p = 1 - len(cpu_rows) / n
    assert abs((1 - found.float().mean().item()) - p) <= 4 * math.sqrt(max(p * (1 - p), 1 / n) * 2 / n) + 1e-9
    # Area share, log aspect ratio and horizontal position: same means (4 standard errors of the
    # difference) and spreads (within 10 %). Fixed seeds: this never flakes, it fails when a rule differs.
    for ours, theirs, what in zip(stats(device_rows), stats(cpu_rows), ("area", "log ratio", "position")):
        sd = statistics.pstdev(theirs)
        assert abs(ours.mean() - theirs.mean()) <= 4 * sd * math.sqrt(1 / len(ours) + 1 / len(theirs)), what
        assert abs(ours.std() / sd - 1) < 0.1, (what, ours.std(), sd)
    areas = stats(device_rows)[0]
    reachable = min(scale[1], 4 * width / (3 * height), 4 * height / (3 * width))
    span = reachable - scale[0]
    assert areas.min() < scale[0] + 0.05 * span and areas.max() > reachable - 0.1 * span


def test_no_crop_fits_falls_back_to_the_models_resize_on_both_paths():
    boxes, found = random_crop_boxes(50, 400, 8, (0.9, 1.0), torch.Generator().manual_seed(0))
    assert not found.any() and random_crop_box(400, 8, (0.9, 1.0), random.Random(0)) is None
    # On a square, a crop whose aspect ratio the draw cannot reach falls back to the eval box.
    augment = DeviceAugment(AugmentConfig(random_resized_crop=True, crop_scale=(1.0, 1.0)), 28)
    draws = augment.draw(400, 32, torch.Generator().manual_seed(0))
    full = torch.tensor([0.0, 0.0, 32.0, 32.0], dtype=torch.float64)
    assert (draws.boxes == full).all()  # scale 1 keeps all of it: a full-square crop or the fallback, same box


def test_flip_happens_half_the_time_and_mirrors():
    pixels = _noise(1000, 6)
    augment = DeviceAugment(AugmentConfig(horizontal_flip=True), 6)
    out = augment(pixels, torch.Generator().manual_seed(0))
    same = (out == pixels).flatten(1).all(1)
    mirrored = (out == pixels.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    n, flips = len(pixels), int(mirrored.sum())
    assert abs(flips - n / 2) <= 4 * math.sqrt(n * 0.25), flips  # Binomial(1000, 0.5): 4 standard deviations
    off = DeviceAugment(AugmentConfig(horizontal_flip=False), 6)
    assert torch.equal(off(pixels, torch.Generator().manual_seed(0)), pixels)


@pytest.mark.parametrize("strength", [0.4, 1.5])
def test_jitter_factors_and_orders_are_drawn_as_on_the_cpu(strength):
    draws = DeviceAugment(AugmentConfig(color_jitter=strength), 8).draw(3000, 8, torch.Generator().manual_seed(1))
    low, high = max(0.0, 1 - strength), 1 + strength
    factors = draws.factors
    assert factors.shape == (3000, 3) and bool(((factors >= low) & (factors <= high)).all())
    span = high - low
    for column in range(3):  # uniform over the range, as random.uniform: covers it, mean in the middle
        f = factors[:, column].double()
        assert f.min() < low + 0.01 * span and f.max() > high - 0.01 * span
        assert abs(f.mean().item() - (low + high) / 2) <= 4 * span / math.sqrt(12 * 3000)
    # Every image gets each operation once, in one of the 6 orders, each as often (CPU: random.shuffle).
    assert all(sorted(row) == [0, 1, 2] for row in draws.order.tolist())
    counts = Counter(tuple(row) for row in draws.order.tolist())
    assert len(counts) == 6
    assert all(abs(c - 500) <= 4 * math.sqrt(3000 * (1 / 6) * (5 / 6)) for c in counts.values()), counts


def test_jitter_gives_pils_pixels_for_the_same_factors_and_order():
    """Each operation is ImageEnhance's blend, truncated as PIL truncates: the same factors in the same
    order give PIL's pixels exactly."""
    pixels = _noise(6, 20, seed=3)
    pixels[0] = 200  # a flat bright image: contrast's mean and the clipping at 255 both show
    factors = [[0.6, 1.4, 0.2], [1.9, 0.3, 1.0], [0.0, 1.0, 2.5], [1.2, 1.2, 1.2], [0.45, 1.75, 0.9], [1.3, 0.7, 1.6]]
    orders = [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1]]
    augment = DeviceAugment(AugmentConfig(color_jitter=1.5), 20)
    out = augment.apply(pixels, _draws([[0, 0, 20, 20]] * 6, factors=factors, order=orders))
    enhancers = {BRIGHTNESS: ImageEnhance.Brightness, CONTRAST: ImageEnhance.Contrast, SATURATION: ImageEnhance.Color}
    for i in range(6):
        image = Image.fromarray(pixels[i].permute(1, 2, 0).numpy())
        for operation in orders[i]:
            factor = float(torch.tensor(factors[i][operation], dtype=torch.float32))
            image = enhancers[operation](image).enhance(factor)
        assert torch.equal(out[i], pil_to_uint8_tensor(image)), i


def test_crop_resamples_the_box_as_pil_does():
    """Bilinear (SigLIP's filter) upscaling of a box equals PIL's resize(box=...) to a level; bicubic
    (CLIP's) differs by its kernel (a = -0.75 here, -0.5 in PIL): close on a smooth image."""
    image = _smooth(64)
    boxes = [[5, 9, 41, 33], [0, 0, 64, 64], [20, 2, 50, 60]]
    for rule, tolerance in ((ResizeRule(SQUASH, None, BILINEAR), 1), (ResizeRule(), 3)):
        augment = DeviceAugment(AugmentConfig(random_resized_crop=True), 80, rule)
        out = augment.apply(_as_batch(image).repeat(3, 1, 1, 1), _draws(boxes, flips=[False, False, True]))
        for i, box in enumerate(boxes):
            expected = pil_to_uint8_tensor(image.resize((80, 80), rule.resample, box=tuple(box)))
            if i == 2:
                expected = expected.flip(-1)
            difference = (out[i].int() - expected.int()).abs()
            assert difference.max() <= tolerance and difference.float().mean() < 0.5, (rule, box, difference.max())


def test_without_a_crop_the_square_gets_the_models_resize():
    """No random crop: the source square becomes the input as the processor's resize + centre crop
    would make it (a processor resizing to 40 and cropping 32 keeps the central 4/5)."""
    image = _smooth(30)
    rule = ResizeRule(SQUASH, 40, BILINEAR)
    augment = DeviceAugment(AugmentConfig(horizontal_flip=True), 32, rule)
    assert augment.eval_box(30) == (3.0, 3.0, 27.0, 27.0)
    out = augment.apply(_as_batch(image), _draws([augment.eval_box(30)]))
    expected = pil_to_uint8_tensor(image.resize((32, 32), BILINEAR, box=(3, 3, 27, 27)))
    assert (out[0].int() - expected.int()).abs().max() <= 1


# -- identity, normalisation, seeding, devices ----------------------------------------------------------


@pytest.fixture(scope="module")
def preprocessing(tokenizer) -> Preprocessing:
    return Preprocessing(image_size=32, image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28),
                         tokenizer=tokenizer, max_text_length=16, pad_to_max_length=False)


@pytest.mark.parametrize("augment", [AugmentConfig(), AugmentConfig(random_resized_crop=True, crop_scale=(1.0, 1.0))],
                         ids=["off", "full-square crop"])
def test_identity_gives_the_pixels_and_normalisation_unchanged(augment, preprocessing):
    pixels = _noise(5, 32, seed=2)
    out = DeviceAugment(augment, 32)(pixels, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == pixels.shape and torch.equal(out, pixels)
    batch = {"pixels": pixels, "input_ids": torch.ones(5, 4, dtype=torch.long),
             "attention_mask": torch.ones(5, 4, dtype=torch.long), "image_ids": torch.arange(5)}
    device_cpu = torch.device("cpu")
    augmented = MicroBatch.on_device(batch, preprocessing, device_cpu,
                                     lambda p: DeviceAugment(augment, 32)(p, torch.Generator().manual_seed(0)))
    plain = MicroBatch.on_device(batch, preprocessing, device_cpu)
    assert augmented.pixels.dtype == torch.float32 and torch.equal(augmented.pixels, plain.pixels)
    assert torch.equal(plain.pixels, preprocessing.normalize(pixels))


def test_same_seed_same_output_other_seed_other_output():
    augment = DeviceAugment(AugmentConfig(random_resized_crop=True, crop_scale=(0.3, 1.0), color_jitter=0.4,
                                          horizontal_flip=True), 24)
    pixels = _noise(8, 28, seed=5)
    first = augment(pixels, torch.Generator().manual_seed(7))
    assert first.shape == (8, 3, 24, 24) and first.dtype == torch.uint8
    assert torch.equal(first, augment(pixels, torch.Generator().manual_seed(7)))
    # A batch of cache rows is channels-last in memory (batches.stack_pixels): the same pixels out.
    channels_last = pixels.contiguous(memory_format=torch.channels_last)
    assert torch.equal(first, augment(channels_last, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(pixels, torch.Generator().manual_seed(8)))
    assert len({first[i].numpy().tobytes() for i in range(8)}) == 8
    assert augment_seed(0, "device-augment", 3, 1, 0) == augment_seed(0, "device-augment", 3, 1, 0)
    assert augment_seed(0, "device-augment", 3, 1, 0) != augment_seed(0, "device-augment", 3, 2, 0)


def test_every_op_follows_the_pixels_device():
    """No step assumes the CPU: on the meta device (shapes only) the whole pipeline runs and stays there."""
    augment = DeviceAugment(AugmentConfig(random_resized_crop=True, color_jitter=0.4, horizontal_flip=True), 24)
    pixels = torch.empty(16, 3, 28, 28, dtype=torch.uint8, device="meta")
    out = augment(pixels, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == (16, 3, 24, 24) and out.dtype == torch.uint8


def test_bad_input_is_refused_naming_what_it_got():
    with pytest.raises(ValueError, match=r"uint8 \(B, 3, S, S\) squares, got torch.float32 \(2, 3, 8, 8\)"):
        DeviceAugment(AugmentConfig(horizontal_flip=True), 8)(torch.zeros(2, 3, 8, 8), torch.Generator())


def test_source_size_and_transform():
    assert source_size(224) == 256 and source_size(224, cache_size=300) == 300
    transform = source_transform(ResizeRule(SQUASH, 224, BILINEAR), 256)
    assert transform.size == 256 and transform.augment is None
    assert transform.rule.at(256) == ResizeRule(SQUASH, 256, BILINEAR)  # the square stands for the whole squash


# -- in training ---------------------------------------------------------------------------------------


def _config(model_dir, data, out, **extra):
    settings = {"model.name": str(model_dir), "data.path": str(data), "train.output_dir": str(out),
                "lora.r": 4, "lora.alpha": 8, "train.micro_batch_size": 4, "train.grad_accum_steps": 2,
                "train.lr": 5e-3, "train.log_every": 1, "data.num_workers": 0, "train.save_every": 0,
                "train.report": False, "train.report_to": "none", "train.max_steps": 2,
                "data.augment.random_resized_crop": True, "data.augment.crop_scale": [0.5, 1.0],
                "data.augment.color_jitter": 0.4, "data.augment.horizontal_flip": True, "data.augment.on_device": True}
    settings.update(extra)
    return load_config(None, settings)


def test_training_with_device_augmentation_trains_and_is_repeatable(tiny_clip_dir, tmp_path):
    from conftest import make_image_folder_dataset

    from cliptune.training.recipe import Trainer

    data = make_image_folder_dataset(tmp_path / "data", n_images=16)
    losses, shapes = [], []
    for name in ("a", "b"):
        trainer = Trainer(_config(tiny_clip_dir, data, tmp_path / name), progress=False)
        trainer.setup()
        loaded = next(iter(trainer.data.loader(0, 0)))
        shapes.append(tuple(loaded["pixels"].shape[1:]))  # what the workers ship: un-augmented squares
        calls = []
        real = trainer._device_augment
        trainer._device_augment = lambda micro, calls=calls, real=real: calls.append(micro) or real(micro)
        result = trainer.train()
        assert result.steps == 2 and calls == [0, 1, 0, 1]  # every micro-batch of both steps
        losses.append([r for r in trainer.run_log.history() if "train_loss" in r])
    assert shapes[0] == (3, 36, 36) == (3, source_size(32), source_size(32))
    assert all(math.isfinite(r["train_loss"]) for r in losses[0])
    assert [r["train_loss"] for r in losses[0]] == [r["train_loss"] for r in losses[1]]  # seeded: repeatable


def test_on_device_without_augmentation_changes_nothing(tiny_clip_dir, tmp_path):
    """`on_device` alone is harmless: the loader ships the model's exact pixels, as without it."""
    from conftest import make_image_folder_dataset

    from cliptune.training.recipe import Trainer

    data = make_image_folder_dataset(tmp_path / "data", n_images=8)
    batches = []
    for on_device in (True, False):
        trainer = Trainer(_config(tiny_clip_dir, data, tmp_path / str(on_device), **{
            "data.augment.random_resized_crop": False, "data.augment.color_jitter": 0.0,
            "data.augment.horizontal_flip": False, "data.augment.on_device": on_device}), progress=False)
        trainer.setup_data()
        assert not trainer.data.augments_on_device and trainer._device_augment(0) is None
        batches.append(next(iter(trainer.data.loader(0, 0)))["pixels"])
    assert batches[0].shape[-1] == 32 and torch.equal(batches[0], batches[1])
