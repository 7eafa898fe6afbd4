"""Every odd input a real dataset or user holds: normalised, or refused with a message naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS, ConfigError, DataConfig, load_config
from cliptune.data.images import ImageError, open_rgb
from cliptune.data.readers import DataError, ImageCaptions, read_split

BIG = DEFAULT_MAX_IMAGE_PIXELS


def _rgb(path: Path, size=(40, 20), colour=(200, 30, 30), **save) -> Path:
    Image.new("RGB", size, colour).save(path, **save)
    return path


# -- images ------------------------------------------------------------------------------------


def test_missing_image(tmp_path):
    with pytest.raises(ImageError, match="nope.jpg: file not found"):
        open_rgb(tmp_path / "nope.jpg", BIG)


def test_zero_byte_image(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.jpg: empty file \(0 bytes\)"):
        open_rgb(tmp_path / "empty.jpg", BIG)


def test_truncated_jpeg(tmp_path):
    data = _rgb(tmp_path / "full.jpg", size=(64, 64)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        open_rgb(tmp_path / "cut.jpg", BIG)


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture", encoding="utf-8")
    with pytest.raises(ImageError, match="notes.jpg: not an image"):
        open_rgb(tmp_path / "notes.jpg", BIG)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    image = open_rgb(tmp_path / "cmyk.jpg", BIG)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full = red


def test_grayscale(tmp_path):
    Image.new("L", (16, 16), 100).save(tmp_path / "grey.png")
    image = open_rgb(tmp_path / "grey.png", BIG)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (100, 100, 100)


def test_palette_png_with_transparency_becomes_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "pal.png", transparency=0)
    out = open_rgb(tmp_path / "pal.png", BIG)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((5, 5)) == (255, 255, 255)


def test_rgba_png_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    assert open_rgb(tmp_path / "rgba.png", BIG).getpixel((1, 1)) == (255, 255, 255)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    array = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    out = open_rgb(tmp_path / "deep.png", BIG)
    value = out.getpixel((0, 0))
    assert out.mode == "RGB" and 120 <= value[0] <= 135 and value[0] == value[1] == value[2]


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = open_rgb(tmp_path / "rot.jpg", BIG)
    assert out.size == (20, 40)
    assert out.getpixel((10, 5))[0] > 200  # the red half is now on top


def test_decompression_bomb_is_refused(tmp_path):
    _rgb(tmp_path / "bomb.png", size=(200, 200))
    with pytest.raises(ImageError, match=r"bomb.png: 200x200 pixels exceeds data.max_image_pixels=10000"):
        open_rgb(tmp_path / "bomb.png", 10_000)


# -- skip vs fail policy (Trainer.setup_data) --------------------------------------------------


def _dataset_with_a_bad_image(tmp_path: Path) -> Path:
    from conftest import make_image_folder_dataset

    path = make_image_folder_dataset(tmp_path / "data", n_images=8)
    (tmp_path / "data" / "images" / "001.png").write_bytes(b"garbage")
    return path


def _setup_data(model_dir, data: Path, policy: str):
    from cliptune.training.recipe import Trainer

    config = load_config(None, {"model.name": str(model_dir), "data.path": str(data), "data.bad_images": policy,
                                "train.device": "cpu", "train.report": False, "data.num_workers": 0,
                                "train.micro_batch_size": 2, "train.grad_accum_steps": 1})
    trainer = Trainer(config, progress=False)
    trainer.setup_model()
    trainer.setup_data()
    return trainer


def test_bad_image_skip_policy_counts_and_lists(tiny_clip_dir, tmp_path):
    trainer = _setup_data(tiny_clip_dir, _dataset_with_a_bad_image(tmp_path), "skip")
    assert len(trainer.data.bad_images) == 1 and trainer.data.bad_images[0][0].endswith("001.png")
    assert "001.png" not in {r.image_path.name for r in trainer.data.records}
    assert trainer.plan.train_images == 5  # 6 train images, one bad


def test_bad_image_fail_policy_names_the_file(tiny_clip_dir, tmp_path):
    from cliptune.training.recipe import TrainingError

    with pytest.raises(TrainingError, match=r"(?s)1 unreadable training image.*001.png") as err:
        _setup_data(tiny_clip_dir, _dataset_with_a_bad_image(tmp_path), "fail")
    assert str(err.value).count("001.png") == 1  # named once, not "path: path: why"


# -- captions and annotation files -------------------------------------------------------------


def _jsonl(tmp_path: Path, rows: list[dict]) -> DataConfig:
    path = tmp_path / "ann.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return DataConfig(path=str(path))


def test_empty_and_whitespace_captions_are_dropped_and_counted(tmp_path):
    cfg = _jsonl(tmp_path, [{"image": "a.jpg", "captions": ["a dog", "", "   "]},
                            {"image": "b.jpg", "captions": ["", " "]},
                            {"image": "c.jpg", "captions": ["a cat"]}])
    records, problems = read_split(cfg, "train")
    assert [r.captions for r in records] == [("a dog",), ("a cat",)]
    assert problems.empty_captions == 4
    assert problems.images_without_captions == ["b.jpg"]  # image with no captions: dropped, listed


def test_long_caption_is_truncated_keeping_the_end_token(tiny_clip_dir):
    from cliptune.config import ModelConfig
    from cliptune.data.batches import tokenize_captions
    from cliptune.models.contrastive import load_model

    _, pre = load_model(ModelConfig(name=str(tiny_clip_dir)))
    record = ImageCaptions("x", Path("x.jpg"), ("dog " * 200, "a short one"))
    tokens = tokenize_captions([record], pre)
    assert tokens.truncated == 1
    long, short = tokens.ids[0]
    assert len(long) == pre.max_text_length and long[-1] == pre.tokenizer.sep_token_id
    assert len(short) < pre.max_text_length


def test_non_utf8_annotation_file(tmp_path):
    path = tmp_path / "ann.json"
    path.write_bytes('{"images": [], "annotations": [{"caption": "caf\u00e9"}]}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"ann.json: not UTF-8"):
        read_split(DataConfig(path=str(path), format="coco"), "train")


def test_non_utf8_jsonl_file(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_bytes('{"image": "a.jpg", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"ann.jsonl.*UTF-8"):
        read_split(DataConfig(path=str(path)), "train")


def test_duplicate_image_ids(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                                "annotations": []}), encoding="utf-8")
    with pytest.raises(DataError, match="repeats image id 1"):
        read_split(DataConfig(path=str(path)), "train")


def test_split_that_does_not_exist_lists_the_existing_ones(tmp_path):
    path = tmp_path / "karpathy.json"
    path.write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "b.jpg", "split": "val", "sentences": [{"raw": "y"}]}]}), encoding="utf-8")
    with pytest.raises(DataError, match=r"no images in split 'tset'.*\['train', 'val'\]"):
        read_split(DataConfig(path=str(path)), "tset")


# -- config, model, adapter ----------------------------------------------------------------------


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'; did you mean 'train.lr'"):
        load_config(None, {"train.lrr": 1})


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: expected an integer, got 'eight'"):
        load_config(None, {"train.micro_batch_size": "eight"})


@pytest.mark.parametrize("field,value", [("train.micro_batch_size", 0), ("train.lr", -1e-4), ("lora.r", 0)])
def test_impossible_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        load_config(None, {field: value})


def test_cli_rejects_an_unknown_key_with_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "cliptune", "train", "--train.lrr", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "did you mean 'train.lr'" in proc.stderr


def test_model_folder_that_does_not_exist(tmp_path):
    from cliptune.config import ModelConfig
    from cliptune.models.contrastive import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "no-such-model")))


def test_unsupported_model_type_points_to_a_command_that_exists(tmp_path, capsys):
    import re

    import transformers

    from cliptune.apps.cli import main
    from cliptune.config import ModelConfig
    from cliptune.models.contrastive import ModelLoadError, load_model

    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'bert' model; supported: clip, siglip") as caught:
        load_model(ModelConfig(name=str(tmp_path)))
    named = re.findall(r"`cliptune (\w+)", str(caught.value))
    assert named, caught.value
    for command in named:  # each one a subcommand the CLI has, not a suggestion that fails
        assert main([command, "--help"]) == 0, f"`cliptune {command}` named in: {caught.value}"
    capsys.readouterr()


def _adapter_from(model_dir: Path, out: Path) -> Path:
    from cliptune.config import LoraSettings, ModelConfig
    from cliptune.models.contrastive import load_model
    from cliptune.models.lora import apply_lora, save_adapter

    model, _ = load_model(ModelConfig(name=str(model_dir)))
    apply_lora(model, LoraSettings(r=2))
    save_adapter(model, out)
    return out


@pytest.mark.parametrize("field, value", [pytest.param("hidden_size", 48, id="different_width"),
                                          pytest.param("num_hidden_layers", 3, id="other_layers")])
def test_adapter_for_another_shape_of_model_is_refused(tiny_clip_dir, tokenizer, tmp_path, field, value):
    import transformers
    from conftest import tiny_clip_config

    from cliptune.config import ModelConfig
    from cliptune.models.contrastive import load_model
    from cliptune.models.lora import load_adapter

    config = tiny_clip_config(tokenizer)
    setattr(config.vision_config, field, value)
    setattr(config.text_config, field, value)
    other_dir = tmp_path / "other"
    transformers.CLIPModel(config).save_pretrained(other_dir)
    tokenizer.save_pretrained(other_dir)
    adapter = _adapter_from(other_dir, tmp_path / "other-adapter")
    clip, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    with pytest.raises(ConfigError, match="does not fit this base model"):
        load_adapter(clip, adapter)
