"""The model's own preprocessing, to the bit: our uint8 path + device normalisation equals the
model's transformers image processor (the PIL one, `CLIPImageProcessorPil` / `SiglipImageProcessorPil`,
which AutoImageProcessor returns where torchvision is not installed and with `backend="pil"`
everywhere) on real photos; the image cache at the input size gives the same pixels; and
`data.max_image_pixels`, not Pillow's own limit, decides which images are too big."""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import save_tiny_clip, save_tiny_siglip
from PIL import Image

from cliptune.config import ModelConfig
from cliptune.data.batches import decode_pixels
from cliptune.data.cache import INDEX_FILE, ImageCache, build_cache
from cliptune.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    SHORTEST_EDGE_CROP,
    SQUASH,
    ImageError,
    ResizeRule,
    normalize_array,
    normalize_pixels,
    open_rgb,
)
from cliptune.data.shards import decode_image_bytes
from cliptune.deploy import embedders
from cliptune.models.contrastive import (
    ModelLoadError,
    Preprocessing,
    image_settings_from_processor,
    load_model,
)


def _coco_photos(coco_mini: Path) -> list[Path]:
    paths = sorted((coco_mini / "images").glob("*.jpg"))
    listed = {image["file_name"] for split in ("train", "val")
              for image in json.loads((coco_mini / f"captions_{split}.json").read_text())["images"]}
    assert {p.name for p in paths} == listed and len(paths) == 130  # every train and val photo
    return paths


@pytest.fixture(scope="module")
def photos(coco_mini):
    """Every coco-mini photo decoded twice: by cliptune (`open_rgb`, the evaluation path) and by PIL
    as a user hands it to the processor. Shared by the CLIP and SigLIP cases: decoding is the slow part."""
    paths = _coco_photos(coco_mini)
    ours = [open_rgb(p) for p in paths]
    theirs = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            theirs.append(image)
    return paths, ours, theirs


def _saved_processor(tmp_path: Path, processor) -> transformers.BaseImageProcessor:
    """Through save_pretrained and AutoImageProcessor, as a hub model's preprocessor_config.json is read."""
    processor.save_pretrained(tmp_path)
    return transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")


def _preprocessing(processor, source: str = "test") -> Preprocessing:
    return Preprocessing(tokenizer=None, max_text_length=1, pad_to_max_length=False,
                         **image_settings_from_processor(processor, source))


CLIP_224 = transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
SIGLIP_224 = transformers.SiglipImageProcessorPil(size={"height": 224, "width": 224})


@pytest.mark.parametrize("processor, kind, mode", [
    (CLIP_224, "CLIPImageProcessorPil", SHORTEST_EDGE_CROP),
    (SIGLIP_224, "SiglipImageProcessorPil", SQUASH),
], ids=["clip", "siglip"])
def test_pixels_equal_the_processor_on_every_coco_mini_photo(photos, tmp_path, processor, kind, mode):
    paths, ours, theirs = photos
    processor = _saved_processor(tmp_path, processor)
    assert type(processor).__name__ == kind  # the PIL processor is the one matched
    preprocessing = _preprocessing(processor)
    assert (preprocessing.resize_mode, preprocessing.image_size) == (mode, 224)
    transform = preprocessing.image_transform()
    pixels = preprocessing.normalize(torch.stack([transform(image) for image in ours]))  # (130, 3, 224, 224)
    expected = processor(images=theirs, return_tensors="pt")["pixel_values"]
    assert pixels.dtype == expected.dtype == torch.float32
    differing = [p.name for p, a, b in zip(paths, pixels, expected) if not torch.equal(a, b)]
    assert not differing, f"{len(differing)} of {len(paths)} photos differ from the processor, e.g. {differing[:3]}"


@pytest.mark.parametrize("processor", [
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}),
], ids=["clip", "siglip"])
def test_files_are_decoded_in_full_for_evaluation_and_search(coco_mini, tmp_path, processor):
    """At a small input size a reduced-scale JPEG decode (draft) would be taken if allowed: the
    evaluation / un-augmented training path (`decode_pixels`) and the search path (`pixel_batch`,
    torch-free, used by the ONNX embedder) must still give the processor's pixels from the file."""
    paths = _coco_photos(coco_mini)[::7]
    processor = _saved_processor(tmp_path, processor)
    p = _preprocessing(processor)
    expected = processor(images=[Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]
    pixels = p.normalize(torch.stack([decode_pixels(path, p.image_transform(), DEFAULT_MAX_IMAGE_PIXELS)
                                      for path in paths]))
    assert torch.equal(pixels, expected)
    searched = embedders.pixel_batch(embedders._as_images(paths), p.image_size, p.image_mean, p.image_std,
                                  p.resize_rule, p.rescale_factor)
    assert np.array_equal(searched, expected.numpy())


def test_the_processors_resample_filter_and_crop_are_followed(photos, tmp_path):
    """Not only the defaults: a SigLIP processor that resizes bilinearly and a CLIP one that resizes
    the shorter side to 256 before a 224 crop."""
    paths, ours, theirs = photos
    for name, processor in {
        "siglip-bilinear": transformers.SiglipImageProcessorPil(size={"height": 64, "width": 64}, resample=2),
        "clip-256-224": transformers.CLIPImageProcessorPil(size={"shortest_edge": 256},
                                                           crop_size={"height": 224, "width": 224}),
    }.items():
        processor = _saved_processor(tmp_path / name, processor)
        preprocessing = _preprocessing(processor)
        transform = preprocessing.image_transform()
        pixels = preprocessing.normalize(torch.stack([transform(image) for image in ours[:12]]))
        assert torch.equal(pixels, processor(images=theirs[:12], return_tensors="pt")["pixel_values"]), name


def test_normalisation_equals_the_processors_for_every_byte_value(tmp_path):
    """All 256 values in each channel, with the usual and with unusual rescale/mean/std: the device
    path (torch) and the torch-free path (numpy, ONNX search) both equal the processor bit for bit."""
    ramp = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)  # (16, 16, 3)
    ramp[..., 1] = ramp[..., 1][::-1]  # other channels see the values in another order
    settings = [
        {},
        {"image_mean": [0.1, 0.7, 0.33], "image_std": [0.9, 0.011, 1.7], "rescale_factor": 1 / 127.5},
        {"do_normalize": False},
        {"do_rescale": False},
    ]
    for extra in settings:
        processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                       crop_size={"height": 16, "width": 16}, **extra)
        processor = _saved_processor(tmp_path / str(len(extra)) / str(sorted(extra)), processor)
        p = _preprocessing(processor)
        expected = processor(images=[Image.fromarray(ramp)], do_resize=False, do_center_crop=False,
                             return_tensors="pt")["pixel_values"]
        uint8 = torch.from_numpy(ramp).permute(2, 0, 1)[None].contiguous()  # (1, 3, 16, 16)
        assert torch.equal(normalize_pixels(uint8, p.image_mean, p.image_std, p.rescale_factor), expected), extra
        assert np.array_equal(normalize_array(uint8.numpy(), p.image_mean, p.image_std, p.rescale_factor),
                              expected.numpy()), extra


def test_load_model_reads_the_processor_config(tmp_path, tokenizer):
    clip = load_model(ModelConfig(name=str(save_tiny_clip(tmp_path / "clip", tokenizer, image_size=48))))[1]
    assert (clip.resize_mode, clip.resize_size, clip.image_size, clip.resample) == (SHORTEST_EDGE_CROP, 48, 48, 3)
    siglip_dir = save_tiny_siglip(tmp_path / "siglip", tokenizer, image_size=32)
    transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=2, image_mean=[0.2, 0.3, 0.4],
                                         rescale_factor=1 / 256).save_pretrained(siglip_dir)
    siglip = load_model(ModelConfig(name=str(siglip_dir)))[1]
    assert (siglip.resize_mode, siglip.resize_size, siglip.image_size, siglip.resample) == (SQUASH, 32, 32, 2)
    assert siglip.image_mean == pytest.approx((0.2, 0.3, 0.4)) and siglip.rescale_factor == 1 / 256
    (siglip_dir / "preprocessor_config.json").unlink()  # no processor config: SigLIP's own defaults
    bare = load_model(ModelConfig(name=str(siglip_dir)))[1]
    assert (bare.resize_mode, bare.image_size, bare.resample, bare.image_mean) == (SQUASH, 32, 3, (0.5, 0.5, 0.5))


def test_an_export_carries_the_models_own_preprocessing(coco_mini, tmp_path, tokenizer):
    """The merged folder's preprocessor_config.json and the ONNX preprocessing.json make the base
    model's pixels: a SigLIP whose processor resizes bilinearly with an unusual rescale and mean."""
    from cliptune.deploy.export import export_model

    base = save_tiny_siglip(tmp_path / "base", tokenizer, image_size=32)
    transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=2, rescale_factor=1 / 256,
                                         image_mean=[0.4, 0.45, 0.5]).save_pretrained(base)
    export_model(str(base), tmp_path / "out", onnx=True)
    paths = _coco_photos(coco_mini)[::26]
    photos = [Image.open(path) for path in paths]
    expected = transformers.AutoImageProcessor.from_pretrained(base, backend="pil")(
        images=photos, return_tensors="pt")["pixel_values"]
    exported = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out", backend="pil")
    assert torch.equal(exported(images=photos, return_tensors="pt")["pixel_values"], expected)
    onnx = embedders.OnnxEmbedder(tmp_path / "out")
    s = onnx.settings
    pixels = embedders.pixel_batch(embedders._as_images(paths), onnx.image_size, s["mean"], s["std"],
                                ResizeRule.from_dict(s["resize"]), s["rescale_factor"])
    assert np.array_equal(pixels, expected.numpy())


@pytest.mark.parametrize("processor, why", [
    (transformers.SiglipImageProcessorPil(size={"height": 224, "width": 192}), "size 224x192 is not square"),
    (transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, do_center_crop=False), "size is a shortest_edge without a centre crop"),
    (transformers.CLIPImageProcessorPil(crop_size={"height": 224, "width": 200}), "crop_size .* is not a square"),
    (transformers.CLIPImageProcessorPil(do_resize=False), "do_resize is false"),
])
def test_a_processor_that_does_not_make_one_square_size_is_refused(processor, why):
    with pytest.raises(ModelLoadError, match=f"some/model: preprocessor_config.json: {why}"):
        image_settings_from_processor(processor, "some/model: preprocessor_config.json")


# -- the image cache -----------------------------------------------------------------------------

@pytest.mark.parametrize("processor", [CLIP_224, SIGLIP_224], ids=["clip", "siglip"])
def test_a_cache_at_the_input_size_gives_the_files_and_the_processors_pixels(coco_mini, tmp_path, processor, caplog):
    paths = _coco_photos(coco_mini)[::13]  # 10 photos of both splits
    processor = _saved_processor(tmp_path / "processor", processor)
    preprocessing = _preprocessing(processor)
    transform = preprocessing.image_transform()
    build_cache(paths, tmp_path / "cache", preprocessing.image_size, workers=1, progress=False,
                rule=preprocessing.resize_rule)
    with caplog.at_level(logging.WARNING, logger="cliptune.data.cache"):
        cache = ImageCache.open(tmp_path / "cache", expect=transform)
    assert cache.exact_for(transform) and not caplog.records
    cached = torch.stack([decode_pixels(path, transform, DEFAULT_MAX_IMAGE_PIXELS, cache) for path in paths])
    from_files = torch.stack([decode_pixels(path, transform, DEFAULT_MAX_IMAGE_PIXELS) for path in paths])
    assert torch.equal(cached, from_files)
    expected = processor(images=[Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]
    assert torch.equal(preprocessing.normalize(cached), expected)


def test_a_cache_of_another_size_or_rule_is_not_used_as_is_and_the_run_log_says_so(coco_mini, tmp_path, caplog):
    paths = _coco_photos(coco_mini)[:3]
    clip = _preprocessing(CLIP_224).image_transform()
    siglip = _preprocessing(SIGLIP_224).image_transform()
    build_cache(paths, tmp_path / "224", 224, workers=1, progress=False)  # `cliptune data cache --size 224`
    build_cache(paths, tmp_path / "256", 256, workers=1, progress=False)
    assert ImageCache.open(tmp_path / "224").exact_for(clip)  # CLIP's rule is the default one
    cases = {("224", siglip): "resized by .*squash", ("256", clip): "holds 256 px images and the model takes 224 px"}
    for (folder, transform), why in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cliptune.data.cache"):
            cache = ImageCache.open(tmp_path / folder, expect=transform)
        assert not cache.exact_for(transform)
        assert len(caplog.records) == 1 and "not identical" in caplog.text
        assert re.search(why, caplog.text), caplog.text
        pixels = decode_pixels(paths[0], transform, DEFAULT_MAX_IMAGE_PIXELS, cache)
        assert pixels.shape == (3, 224, 224)  # resized again from the cached square
    # A cache written before exact preprocessing (no "resize" in its index) is never taken as exact.
    index = json.loads((tmp_path / "224" / INDEX_FILE).read_text())
    del index["resize"]
    (tmp_path / "224" / INDEX_FILE).write_text(json.dumps(index))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cliptune.data.cache"):
        assert not ImageCache.open(tmp_path / "224", expect=clip).exact_for(clip)
    assert "rebuild it" in caplog.text


# -- data.max_image_pixels is the limit, not Pillow's ---------------------------------------------

def _png(path: Path, width: int, height: int, pixels: bool = True) -> Path:
    """A 1-bit black PNG (a few kB however large), or with `pixels=False` only the header that
    claims the size: enough for a refusal, which must happen before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))  # 1-bit greyscale
    body = chunk(b"IDAT", zlib.compress(bytes(height * (1 + (width + 7) // 8)), 9)) if pixels else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + body + chunk(b"IEND", b""))
    return path


def test_max_image_pixels_is_the_limit_on_both_sides_of_pillows_own(tmp_path, monkeypatch):
    # Pillow's limit made small, so a small image is "a bomb" to Pillow (an error above twice its
    # limit): what decides must be data.max_image_pixels, on both sides of it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    image = _png(tmp_path / "wide.png", 60, 50)  # 3,000 pixels
    assert open_rgb(image, max_pixels=3_000).size == (60, 50)
    with pytest.raises(ImageError, match=r"wide.png: 60x50 pixels exceeds data.max_image_pixels=2999"):
        open_rgb(image, max_pixels=2_999)
    data = image.read_bytes()  # WebDataset shards decode bytes with the same rule
    assert decode_image_bytes(data, "shard-0:wide", max_pixels=3_000).size == (60, 50)
    with pytest.raises(ImageError, match=r"shard-0:wide: 60x50 pixels exceeds data.max_image_pixels=2999"):
        decode_image_bytes(data, "shard-0:wide", max_pixels=2_999)
    assert Image.MAX_IMAGE_PIXELS == 1_000  # the user's own setting is back afterwards


def test_concurrent_decodes_keep_the_limit_and_restore_pillows(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    paths = [_png(tmp_path / f"{i}.png", 40 + i, 50) for i in range(16)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(lambda p: open_rgb(p, max_pixels=10_000).size, paths * 4))
    assert sizes == [(40 + i, 50) for i in range(16)] * 4
    assert Image.MAX_IMAGE_PIXELS == 1_000


def test_a_9500x9500_image_decodes_under_the_default_limit(tmp_path):
    """The issue's case at Pillow's real limit (89.5M pixels): 90.25M pixels are under the 100M default."""
    image = open_rgb(_png(tmp_path / "big.png", 9500, 9500), DEFAULT_MAX_IMAGE_PIXELS)
    assert image.size == (9500, 9500) and image.mode == "RGB"


@pytest.mark.parametrize("width, height, limit", [(10_001, 10_000, DEFAULT_MAX_IMAGE_PIXELS),
                                                  (30_000, 20_000, 500_000_000)])
def test_an_image_over_the_limit_is_refused_by_name_before_decoding(tmp_path, width, height, limit):
    path = _png(tmp_path / "huge.png", width, height, pixels=False)  # a header only: nothing to decode
    with pytest.raises(ImageError, match=rf"huge.png: {width}x{height} pixels exceeds data.max_image_pixels={limit}"):
        open_rgb(path, limit)


def test_resize_rule_round_trips_through_a_cache_index():
    rule = ResizeRule(SQUASH, 256, 2)
    assert ResizeRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert ResizeRule().at(224) == ResizeRule(SHORTEST_EDGE_CROP, 224, 3)
    with pytest.raises(ValueError, match="resize mode 'stretch' is not one of shortest_edge_crop, squash"):
        ResizeRule("stretch")
