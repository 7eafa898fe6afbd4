from pathlib import Path

import pytest

from cliptune.apps.cli import main
from cliptune.config import ConfigError, load_config, save_config
from cliptune.config_flags import parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_seed_config_loads_with_the_seed_recipe():
    config = load_config(REPO / "src" / "cliptune" / "configs" / "flickr30k_vitb32_lora.yaml")
    assert config.model.name == "openai/clip-vit-base-patch32"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 32, 0.1)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    assert (config.lora.vision, config.lora.text) == ("lora", "lora")
    assert (config.train.micro_batch_size, config.train.grad_accum_steps, config.train.epochs) == (8, 4, 3)
    assert config.train.effective_batch_size == 32
    assert config.train.lr == 1e-4 and config.train.schedule == "cosine"


def test_overrides_are_typed_and_nested():
    overrides = parse_overrides(["--train.lr", "5e-5", "--lora.vision=frozen", "--data.augment.crop_scale", "[0.5, 1.0]",
                                 "--train.max_steps", "null", "--lora.target_modules", "q_proj,v_proj"])
    config = load_config(None, overrides)
    assert config.train.lr == 5e-5 and isinstance(config.train.lr, float)
    assert config.lora.vision == "frozen"
    assert config.data.augment.crop_scale == (0.5, 1.0)
    assert config.train.max_steps is None
    assert config.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("overrides, message", [
    ({"train.lrr": 1}, "did you mean 'train.lr'"),
    ({"trian.lr": 1}, "did you mean 'train'"),
    ({"train.micro_batch_size": 0}, "train.micro_batch_size"),
    ({"train.lr": -1.0}, "train.lr"),
    ({"lora.r": 0}, "lora.r"),
    ({"train.epochs": "three"}, "train.epochs: expected an integer"),
    ({"lora.vision": "lorra"}, "did you mean 'lora'"),
    ({"train.max_grad_norm": 0}, "train.max_grad_norm"),
    ({"data.augment.crop_scale": [0.9, 0.5]}, "data.augment.crop_scale"),
    ({"lora.use_dora": "maybe"}, "lora.use_dora: expected true or false"),
])
def test_bad_keys_and_values_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(REPO / "src" / "cliptune" / "configs" / "flickr30k_vitb32_lora.yaml", {"train.lr": 3e-4})
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_cli_refuses_a_typo_with_exit_code_2(capsys):
    assert main(["train", "--train.lrr", "1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_names_fall_back_to_the_configs_shipped_in_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged one is read
    assert load_config("configs/flickr30k_vitb32_lora.yaml").lora.r == 16
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "flickr30k_vitb32_lora.yaml").write_text("lora:\n  r: 4\n", encoding="utf-8")
    assert load_config("configs/flickr30k_vitb32_lora.yaml").lora.r == 4  # a file of that name here wins
    with pytest.raises(ConfigError, match=r"config file not found: configs/nope.yaml .*configs/coco_mini_tiny.yaml"):
        load_config("configs/nope.yaml")
