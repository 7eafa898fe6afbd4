"""End-to-end training on tiny models: outputs, learning, repeatability, the CLI."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from cliptune.cli import main
from cliptune.config import load_config
from cliptune.train import Trainer


def _overrides(model_dir, data_path, out, **extra):
    settings = {"model.name": str(model_dir), "data.path": str(data_path), "train.output_dir": str(out),
                "lora.r": 4, "lora.alpha": 8, "train.micro_batch_size": 4, "train.grad_accum_steps": 2,
                "train.lr": 5e-3, "train.log_every": 1, "data.num_workers": 0, "train.save_every": 0}
    settings.update(extra)
    return settings


@pytest.fixture
def colour_data(tmp_path):
    from conftest import make_image_folder_dataset

    return make_image_folder_dataset(tmp_path / "data", n_images=16)


def test_tiny_run_learns_and_writes_every_output(tiny_clip_dir, colour_data, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(load_config(None, _overrides(tiny_clip_dir, colour_data, out, **{"train.epochs": 8,
                                                                                        "train.eval_every": 4})))
    trainer.setup()
    result = trainer.train()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in history if "train_loss" in r]
    assert len(losses) == result.steps == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the loss falls
    assert any("val_image_to_text_R@1" in r for r in history)
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "report.md", "report.html", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    assert set(result.results) == {"zero-shot", "fine-tuned"}
    assert load_config(out / "config.yaml") == trainer.config
    # The adapter loads in plain PEFT.
    plain = peft.PeftModel.from_pretrained(transformers.CLIPModel.from_pretrained(str(tiny_clip_dir)), str(out / "adapter"))
    assert any("lora_B" in n for n, _ in plain.named_parameters())


def test_same_seed_same_adapter_on_cpu(tiny_clip_dir, colour_data, tmp_path):
    weights = []
    for name in ("a", "b"):
        trainer = Trainer(load_config(None, _overrides(tiny_clip_dir, colour_data, tmp_path / name,
                                                       **{"train.max_steps": 3, "train.report": False,
                                                          "lora.dropout": 0.1})), progress=False)
        trainer.setup()
        trainer.train()
        weights.append(load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_siglip_trains_with_the_sigmoid_loss(tiny_siglip_dir, colour_data, tmp_path):
    trainer = Trainer(load_config(None, _overrides(tiny_siglip_dir, colour_data, tmp_path / "s",
                                                   **{"train.max_steps": 2, "train.report": False,
                                                      "lora.train_logit_scale": True})))
    trainer.setup()
    assert trainer.loss_fn.kind == "siglip"
    bias_before = float(trainer.model.logit_bias)
    trainer.train()
    assert float(trainer.model.logit_bias) != bias_before


def test_cli_dry_run_prints_counts_and_plan_without_training(tiny_clip_dir, colour_data, tmp_path, capsys):
    code = main(["train", "--dry-run", "--model.name", str(tiny_clip_dir), "--data.path", str(colour_data),
                 "--train.output_dir", str(tmp_path / "dry")])
    out = capsys.readouterr().out
    assert code == 0
    assert "trainable params:" in out and "|| trainable%:" in out
    assert "plan: 3 optimizer steps = 3 epoch(s) x 1 steps; effective batch 32" in out
    assert not (tmp_path / "dry").exists()


def test_cli_train_then_eval_with_adapter_scales(tiny_clip_dir, colour_data, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--model.name", str(tiny_clip_dir), "--data.path", str(colour_data), "--train.output_dir", str(out),
            "--train.max_steps", "2", "--data.num_workers", "0", "--train.micro_batch_size", "4"]
    assert main(args) == 0
    assert "fine-tuned" in capsys.readouterr().out
    code = main(["eval", "--model", str(tiny_clip_dir), "--adapter", str(out / "adapter"), "--scales", "0,0.5,1",
                 "--data", str(colour_data), "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "adapter x0.5" in printed and "image_to_text_R@1" in printed
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(results) == ["zero-shot", "adapter x0", "adapter x0.5", "adapter x1"]
    # Scale 0 is the zero-shot model exactly.
    assert results["adapter x0"] == results["zero-shot"]
    assert (tmp_path / "eval" / "report.html").is_file()


def test_eval_adds_zero_shot_classification_accuracy(tiny_clip_dir, colour_data, tmp_path):
    from PIL import Image

    from cliptune.compare import EvalRequest, compare_variants, read_labelled_folder
    from cliptune.config import DataConfig, ModelConfig

    folder = tmp_path / "classes"
    for name, rgb in {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220)}.items():
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40 + i, 40), rgb).save(folder / name / f"{i}.png")
    paths, labels, classes = read_labelled_folder(folder)
    assert classes == ["blue", "green", "red"] and labels == [0, 0, 1, 1, 2, 2] and len(paths) == 6
    results = compare_variants(EvalRequest(model=ModelConfig(name=str(tiny_clip_dir)),
                                           data=DataConfig(path=str(colour_data)), classify_folder=folder))
    accuracy = results["zero-shot"]["zeroshot_classification_accuracy"]
    correct = accuracy * len(paths) / 100  # accuracy is a share of 6 images
    assert 0 <= correct <= 6 and abs(correct - round(correct)) < 1e-6
