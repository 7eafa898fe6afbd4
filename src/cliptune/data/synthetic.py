"""A deterministic, learnable "scenes" image-caption dataset for offline demos and tests.

Each image holds 1-3 coloured shapes at distinct places (left, right, top, bottom, center) on a
textured background; each of its 5 captions says, in different words, which shape of which colour is
where. Retrieval on it needs colour, shape and layout together, so a model has something to learn,
and it is generated in a couple of seconds with PIL alone.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["generate_scenes", "Scene", "Item"]

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "orange": (250, 130, 10),
    "purple": (140, 40, 170),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Region centres as fractions of the image side; a shape's centre is jittered around its region's.
REGIONS = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
PLACE_PHRASES = {
    "left": ("on the left", "on the left side", "to the left"),
    "right": ("on the right", "on the right side", "to the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "in the centre"),
}
# Muted backgrounds, far from every shape colour, so "a red ..." never describes the background.
BACKGROUNDS = (
    (120, 120, 130),
    (95, 110, 100),
    (135, 120, 105),
    (100, 105, 125),
    (80, 80, 85),
    (150, 145, 140),
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    place: str
    large: bool


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]


def _sample_scene(rng: random.Random) -> Scene:
    n = rng.choice((1, 2, 2, 3, 3))
    places = rng.sample(list(REGIONS), n)
    items = tuple(Item(rng.choice(SHAPES), rng.choice(list(COLOURS)), p, rng.random() < 0.5) for p in places)
    return Scene(items)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(0.05, 0.2)
    phase = xx * math.cos(angle) + yy * math.sin(angle)  # (size, size)
    stripes = 12 * np.sin(2 * math.pi * phase / period)
    gradient = 25 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
    noise = rng.normal(0, 6, size=(size, size, 1))
    image = base + (stripes + gradient)[..., None] + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "square":
        angles, radii = [rotation + math.pi / 4 + k * math.pi / 2 for k in range(4)], [r * 1.1] * 4
    elif shape == "triangle":
        angles, radii = [rotation - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)], [r * 1.2] * 3
    elif shape == "diamond":
        angles, radii = [k * math.pi / 2 for k in range(4)], [r * 1.2, r * 0.8, r * 1.2, r * 0.8]
    elif shape == "star":
        angles = [rotation - math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r * 1.25 if k % 2 == 0 else r * 0.5 for k in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii, strict=True)]


def _draw_scene(scene: Scene, rng: random.Random, np_rng: np.random.Generator, size: int) -> Image.Image:
    image = Image.fromarray(_background(np_rng, size))
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        fx, fy = REGIONS[item.place]
        cx = (fx + rng.uniform(-0.05, 0.05)) * size
        cy = (fy + rng.uniform(-0.05, 0.05)) * size
        r = size * (0.12 if item.large else 0.07)
        fill = COLOURS[item.colour]
        outline = (20, 20, 20)
        if item.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=2)
        else:
            rotation = rng.uniform(-0.2, 0.2)
            draw.polygon(_polygon(item.shape, cx, cy, r, rotation), fill=fill, outline=outline, width=2)
    return image


def _phrase(item: Item, rng: random.Random, with_size: bool = False) -> str:
    words = f"{'large ' if item.large else 'small '}{item.colour}" if with_size else item.colour
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {item.shape}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five true, differently worded captions."""
    items = list(scene.items)

    def place(item: Item) -> str:
        return rng.choice(PLACE_PHRASES[item.place])

    shuffled = items[:]
    rng.shuffle(shuffled)
    n = len(items)
    plural = "shape" if n == 1 else "shapes"
    captions = [
        _join([f"{_phrase(i, rng)} {place(i)}" for i in items]),
        "there is " + _join([f"{_phrase(i, rng)} {place(i)}" for i in shuffled]) + " in the picture",
        "an image of " + _join([f"{_phrase(i, rng, with_size=True)} {place(i)}" for i in items]),
        "; ".join(f"{place(i)} {_phrase(i, rng)}" for i in shuffled),
        f"{NUMBER_WORDS[n]} {plural} on a textured background: "
        + _join([f"{_phrase(i, rng)} {place(i)}" for i in reversed(items)]),
    ]
    return captions


def _image_key(seed: int, split_id: int, index: int) -> int:
    return (seed * 1_000_003 + split_id) * 10_000_019 + index


def generate_scenes(
    out_dir: Path, n_train: int = 200, n_val: int = 50, seed: int = 0, image_size: int = 224
) -> Path:
    """Write `out_dir/images/<split>_<i>.png` and `out_dir/captions.jsonl`; return the jsonl's path.

    Each jsonl line is `{"image": "images/train_0000.png", "captions": [5 strings], "split": "train"|"val"}`,
    with image paths relative to the jsonl's folder. The same seed gives byte-identical files.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train} and {n_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for split, count, split_id in (("train", n_train, 0), ("val", n_val, 1)):
        for i in range(count):
            # One generator per image: a record doesn't depend on how many others were made before it.
            key = _image_key(seed, split_id, i)
            rng = random.Random(key)
            np_rng = np.random.default_rng(key)
            scene = _sample_scene(rng)
            image = _draw_scene(scene, rng, np_rng, image_size)
            rel = f"images/{split}_{i:04d}.png"
            image.save(out / rel, format="PNG", compress_level=1)  # PIL writes no timestamp: deterministic
            records.append({"image": rel, "captions": _captions(scene, rng), "split": split})
    jsonl = out / "captions.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return jsonl
