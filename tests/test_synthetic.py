"""Tests for cliptune.data.synthetic: format, determinism, and captions that tell the truth."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from cliptune.data.synthetic import (
    COLOURS,
    PLACE_PHRASES,
    REGIONS,
    _image_key,
    _sample_scene,
    generate_scenes,
)


def _records(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


def test_format(tmp_path):
    jsonl = generate_scenes(tmp_path / "scenes", n_train=6, n_val=3, seed=0, image_size=64)
    assert jsonl == tmp_path / "scenes" / "captions.jsonl"
    records = _records(jsonl)
    assert [r["split"] for r in records] == ["train"] * 6 + ["val"] * 3
    assert len({r["image"] for r in records}) == 9
    for r in records:
        assert set(r) == {"image", "captions", "split"}
        assert r["image"].startswith("images/") and r["image"].endswith(".png")
        assert len(r["captions"]) == 5 and len(set(r["captions"])) == 5
        assert all(isinstance(c, str) and c for c in r["captions"])
        with Image.open(jsonl.parent / r["image"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = generate_scenes(tmp_path / "a", n_train=5, n_val=2, seed=3)
    b = generate_scenes(tmp_path / "b", n_train=5, n_val=2, seed=3)
    c = generate_scenes(tmp_path / "c", n_train=5, n_val=2, seed=4)
    assert a.read_bytes() == b.read_bytes()
    for r in _records(a):
        assert (a.parent / r["image"]).read_bytes() == (b.parent / r["image"]).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_train_and_val_images_differ(tmp_path):
    jsonl = generate_scenes(tmp_path, n_train=20, n_val=20, seed=0, image_size=32)
    records = _records(jsonl)
    train = {(tmp_path / r["image"]).read_bytes() for r in records if r["split"] == "train"}
    val = {(tmp_path / r["image"]).read_bytes() for r in records if r["split"] == "val"}
    assert not train & val


def test_captions_name_every_shape_colour_and_place(tmp_path):
    jsonl = generate_scenes(tmp_path, n_train=30, n_val=0, seed=1, image_size=96)
    for i, record in enumerate(_records(jsonl)):
        # Rebuild the scene the generator drew from its per-image random stream.
        scene = _sample_scene(random.Random(_image_key(1, 0, i)))
        for caption in record["captions"]:
            for item in scene.items:
                assert f"{item.colour} {item.shape}" in caption, (caption, item)
                assert any(p in caption for p in PLACE_PHRASES[item.place]), (caption, item)
        # The named colour is really painted in the named region.
        pixels = np.asarray(Image.open(tmp_path / record["image"]), dtype=np.int16)  # (96, 96, 3)
        for item in scene.items:
            fx, fy = REGIONS[item.place]
            x0, x1 = int((fx - 0.2) * 96), int((fx + 0.2) * 96)
            y0, y1 = int((fy - 0.2) * 96), int((fy + 0.2) * 96)
            window = pixels[max(y0, 0) : y1, max(x0, 0) : x1]
            exact = (np.abs(window - np.array(COLOURS[item.colour])).sum(-1) == 0).sum()
            assert exact >= 10, (record["image"], item)
