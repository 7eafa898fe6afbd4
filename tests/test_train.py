"""End-to-end training on tiny models: outputs, learning, repeatability, the CLI."""

import json
import math

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from cliptune.apps.cli import main
from cliptune.config import load_config
from cliptune.training.recipe import Trainer


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
    code = main(["eval", "--model.name", str(tiny_clip_dir), "--adapter", str(out / "adapter"), "--scales", "0,0.5,1",
                 "--data.path", str(colour_data), "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "cli x0.5" in printed and "image_to_text_R@1" in printed
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"]
    assert list(results) == ["zero-shot", "cli x0", "cli x0.5", "cli x1"]  # labelled by the run folder
    # Scale 0 is the zero-shot model exactly.
    assert results["cli x0"] == results["zero-shot"]
    assert (tmp_path / "eval" / "report.html").is_file()


def _colour_sensitive_clip(out, tokenizer):
    """The tiny CLIP with its patch embedding scaled up: at init its image features barely depend on
    the pixels, so every image gets one class and an accuracy check could not tell right labels from
    wrong. Scaled, colour reaches the features and the predictions differ from image to image."""
    from conftest import save_tiny_clip

    save_tiny_clip(out, tokenizer, seed=0)
    model = transformers.CLIPModel.from_pretrained(str(out))
    with torch.no_grad():
        model.vision_model.embeddings.patch_embedding.weight.mul_(10.0)
    model.save_pretrained(out)
    return out


def test_eval_adds_zero_shot_classification_accuracy(tokenizer, colour_data, tmp_path):
    import colorsys

    from PIL import Image

    from cliptune.config import DataConfig, ModelConfig
    from cliptune.evaluation.compare import EvalRequest, compare_variants, read_labelled_folder

    model_dir = _colour_sensitive_clip(tmp_path / "model", tokenizer)
    folder = tmp_path / "classes"
    hues = {"red": 0.0, "green": 1 / 3, "blue": 2 / 3}
    for k in range(12):  # 12 hues round the colour wheel, each filed under the nearest primary
        hue = k / 12
        name = min(hues, key=lambda n: min(abs(hue - hues[n]), 1 - abs(hue - hues[n])))
        (folder / name).mkdir(parents=True, exist_ok=True)
        rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 0.9))
        Image.new("RGB", (40 + k % 2, 40), rgb).save(folder / name / f"{k:02d}.png")
    paths, labels, classes = read_labelled_folder(folder)
    assert classes == ["blue", "green", "red"] and len(paths) == 12
    assert labels == [classes.index(p.parent.name) for p in paths] and set(labels) == {0, 1, 2}
    results = compare_variants(EvalRequest(model=ModelConfig(name=str(model_dir)),
                                           data=DataConfig(path=str(colour_data)), classify_folder=folder))
    accuracy = results["zero-shot"]["zeroshot_classification_accuracy"]
    # The same classification done with plain transformers: its processor, its tokenizer, its features.
    model = transformers.CLIPModel.from_pretrained(str(model_dir)).eval()
    processor = transformers.CLIPImageProcessorPil.from_pretrained(str(model_dir))
    text_tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))

    def features(output) -> torch.Tensor:  # transformers 5 returns an output object, 4 a tensor
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        image = torch.nn.functional.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
        prompts = text_tokenizer([f"a photo of a {name}" for name in classes], padding=True, return_tensors="pt")
        text = torch.nn.functional.normalize(features(model.get_text_features(**prompts)), dim=-1)
    similarity = image @ text.T  # (12 images, 3 classes)
    predicted = similarity.argmax(dim=1)
    top2 = similarity.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-tie that a rounding difference could flip
    expected = 100.0 * float((predicted == torch.tensor(labels)).float().mean())
    # The check has teeth: the predictions differ between images and some are right, some wrong.
    assert len(set(predicted.tolist())) > 1 and 0 < expected < 100, (predicted, expected)
    assert accuracy == pytest.approx(expected, abs=1e-9)


def test_logged_lr_is_the_lr_each_step_used(tiny_clip_dir, colour_data, tmp_path):
    """metrics.jsonl's lr for step s is the lr the optimizer applied in step s (it was one step late)."""
    out = tmp_path / "lr"
    base_lr, total, warmup = 1e-3, 6, 3
    trainer = Trainer(load_config(None, _overrides(tiny_clip_dir, colour_data, out, **{
        "train.max_steps": total, "train.warmup_ratio": 0.5, "train.schedule": "cosine", "train.lr": base_lr,
        "train.micro_batch_size": 2, "train.grad_accum_steps": 1, "train.report": False})), progress=False)
    trainer.setup()
    applied = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    trainer.train()
    logged = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]

    def expected(step: int) -> float:  # 1-based; schedule.py's rule written out by hand
        if step <= warmup:
            return base_lr * step / (warmup + 1)
        return base_lr * 0.5 * (1 + math.cos(math.pi * (step - 1 - warmup) / (total - warmup)))

    assert applied == pytest.approx([expected(s) for s in range(1, total + 1)], rel=1e-12)
    assert logged == applied


def _total_norm(params) -> float:
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    assert grads, "no gradient to measure"
    return float(torch.sqrt(sum((g * g).sum() for g in grads)))


@pytest.mark.parametrize("max_grad_norm", [0.25, None])
def test_the_optimizer_steps_on_gradients_clipped_to_max_grad_norm(tiny_clip_dir, colour_data, tmp_path,
                                                                    max_grad_norm):
    trainer = Trainer(load_config(None, _overrides(tiny_clip_dir, colour_data, tmp_path / "clip", **{
        "train.max_steps": 3, "train.max_grad_norm": max_grad_norm, "train.report": False,
        "train.micro_batch_size": 2, "train.grad_accum_steps": 1})), progress=False)
    trainer.setup()
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda *args: loss_fn(*args) * 1e4  # gradients far above any sensible norm
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    raw, applied = [], []
    optimizer_step = trainer.optimizer_step

    def measure_then_step():
        raw.append(_total_norm(trainable))
        return optimizer_step()

    trainer.optimizer_step = measure_then_step
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: applied.append(_total_norm(trainable)))
    trainer.train()
    assert len(raw) == len(applied) == 3
    assert min(raw) > 100  # without clipping the step would see these
    if max_grad_norm is None:
        assert applied == raw  # clipping off: the gradients reach the optimizer untouched
    else:
        assert applied == pytest.approx([max_grad_norm] * 3, rel=1e-5)


def _captions_of_many_lengths(root):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    words = "a small brown dog runs fast across the wet green field near old stone walls".split()
    lines = []
    for i in range(10):
        Image.new("RGB", (40, 36), (20 * i, 100, 200 - 15 * i)).save(root / "images" / f"{i}.png")
        caption = " ".join(words[: 1 + (5 * i) % len(words)])  # 1 to 14 words, in no order
        lines.append(json.dumps({"image": f"images/{i}.png", "captions": [caption],
                                 "split": "val" if i >= 8 else "train"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_captions_are_padded_to_the_batch_longest_and_siglip_to_its_context(family, tiny_clip_dir, tiny_siglip_dir,
                                                                            tmp_path):
    model_dir = tiny_clip_dir if family == "clip" else tiny_siglip_dir
    data = _captions_of_many_lengths(tmp_path / "data")
    trainer = Trainer(load_config(None, _overrides(model_dir, data, tmp_path / "pad", **{
        "train.max_steps": 4, "train.micro_batch_size": 2, "train.grad_accum_steps": 1, "train.report": False})),
        progress=False)
    trainer.setup()
    seen = []
    train_step = trainer.train_step
    trainer.train_step = lambda micro: (seen.extend(micro), train_step(micro))[1]
    trainer.train()
    # Independently of cliptune: the saved tokenizer and the model's text context from config.json.
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    context = json.loads((model_dir / "config.json").read_text())["text_config"]["max_position_embeddings"]
    captions = [record.captions[0] for record in trainer.data.records]
    widths = []
    assert len(seen) == 4
    for batch in seen:
        tokens = [tokenizer(captions[i])["input_ids"] for i in batch["image_ids"].tolist()]
        width = context if family == "siglip" else max(len(t) for t in tokens)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(tokens), width)
        for row, t in enumerate(tokens):
            assert batch["input_ids"][row, : len(t)].tolist() == t
            assert batch["attention_mask"][row].tolist() == [1] * len(t) + [0] * (width - len(t))
            assert set(batch["input_ids"][row, len(t):].tolist()) <= {tokenizer.pad_token_id}
        widths.append(width)
    if family == "clip":  # the batches differ in their longest caption, and none is padded to the context
        assert len(set(widths)) > 1 and max(widths) < context
