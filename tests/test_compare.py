"""`cliptune eval` tables say what they compare: one labelled column per adapter, and what was
scored and skipped, on the console and in metrics.json. Train's pre-flight image check speaks too."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder_dataset

from cliptune.apps.cli import main
from cliptune.config import ConfigError, DataConfig, LoraSettings, ModelConfig
from cliptune.evaluation.compare import AdapterSpec, EvalRequest, default_label, parse_adapter_spec
from cliptune.models.contrastive import load_model
from cliptune.models.lora import apply_lora, save_adapter


@pytest.fixture
def colour_data(tmp_path):
    return make_image_folder_dataset(tmp_path / "data", n_images=16)


def _adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter whose B matrices are random (as if trained), so two seeds give two models."""
    model, _ = load_model(ModelConfig(name=str(model_dir)))
    apply_lora(model, LoraSettings(r=4, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_adapter(model, out)
    return out


def _corrupt(paths: list[Path]) -> None:
    for path in paths:
        path.write_bytes(b"not an image at all")


def _val_images(data_path: Path) -> list[Path]:
    lines = [json.loads(line) for line in data_path.read_text().splitlines()]
    return [data_path.parent / item["image"] for item in lines if item["split"] == "val"]


# --- labels ---------------------------------------------------------------------------------------

def test_default_label_is_the_run_folder(tmp_path, monkeypatch):
    (tmp_path / "runs" / "a" / "adapter").mkdir(parents=True)
    (tmp_path / "exports" / "my-lora").mkdir(parents=True)
    assert default_label(tmp_path / "runs" / "a" / "adapter") == "a"
    assert default_label(Path(f"{tmp_path}/runs/a/adapter/")) == "a"
    assert default_label(tmp_path / "exports" / "my-lora") == "my-lora"
    monkeypatch.chdir(tmp_path / "runs" / "a")
    assert default_label(Path("adapter")) == "a"
    assert parse_adapter_spec("adapter") == AdapterSpec("a", Path("adapter"))
    assert parse_adapter_spec("base-lr=runs/x/adapter") == AdapterSpec("base-lr", Path("runs/x/adapter"))
    (tmp_path / "runs" / "a" / "lr=1e-3").mkdir()  # an existing folder whose name holds "=" is a path
    assert parse_adapter_spec("lr=1e-3") == AdapterSpec("lr=1e-3", Path("lr=1e-3"))
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_adapter_spec("=runs/x/adapter")


def test_duplicate_labels_are_refused_naming_the_label(tiny_clip_dir, colour_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="two adapters are labelled 'a'"):
        EvalRequest(model=ModelConfig(name="m"), data=DataConfig(path="d"),
                    adapters=[AdapterSpec("a", Path("x/a/adapter")), AdapterSpec("a", Path("y/a/adapter"))])
    with pytest.raises(ConfigError, match="'zero-shot' is the base model's column"):
        EvalRequest(model=ModelConfig(name="m"), data=DataConfig(path="d"),
                    adapters=[AdapterSpec("zero-shot", Path("zero-shot/adapter"))])
    first = _adapter(tiny_clip_dir, tmp_path / "x" / "run" / "adapter", seed=1)
    second = _adapter(tiny_clip_dir, tmp_path / "y" / "run" / "adapter", seed=2)
    code = main(["eval", "--model.name", str(tiny_clip_dir), "--adapter", str(first), "--adapter", str(second),
                 "--data.path", str(colour_data)])
    assert code == 2
    assert "two adapters are labelled 'run'" in capsys.readouterr().err


def test_two_runs_get_two_labelled_columns(tiny_clip_dir, colour_data, tmp_path, capsys):
    first = _adapter(tiny_clip_dir, tmp_path / "runs" / "a" / "adapter", seed=1)
    second = _adapter(tiny_clip_dir, tmp_path / "runs" / "b" / "adapter", seed=2)
    code = main(["eval", "--model.name", str(tiny_clip_dir), "--adapter", str(first), "--adapter", f"bee={second}",
                 "--data.path", str(colour_data), "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert code == 0
    header = printed.splitlines()[0].split()
    assert header[:2] == ["metric", "zero-shot"] and "a" in header and "bee" in header
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(saved["results"]) == ["zero-shot", "a", "bee"]
    assert saved["results"]["a"] != saved["results"]["bee"]  # neither overwrote the other
    assert saved["adapters"] == {"a": str(first), "bee": str(second)}


def test_missing_adapter_is_refused_before_any_scoring(tiny_clip_dir, colour_data, tmp_path, monkeypatch):
    import cliptune.evaluation.compare as compare

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored the zero-shot model before checking the adapters")

    monkeypatch.setattr(compare, "embed_split", no_scoring)
    request = EvalRequest(model=ModelConfig(name=str(tiny_clip_dir)), data=DataConfig(path=str(colour_data)),
                          adapters=[AdapterSpec("b", tmp_path / "runs" / "b" / "adapter")])
    with pytest.raises(ConfigError, match="runs/b/adapter: folder does not exist"):
        compare.compare_variants(request)


# --- what was scored and skipped ------------------------------------------------------------------

def test_eval_says_what_it_scored_and_skipped(tiny_clip_dir, tmp_path, capsys):
    data = make_image_folder_dataset(tmp_path / "data", n_images=40)  # 10 val images x 3 captions
    broken = _val_images(data)[:7]
    _corrupt(broken)
    code = main(["eval", "--model.name", str(tiny_clip_dir), "--data.path", str(data), "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    # One summary line and the first five files with their reasons, then the table.
    assert printed[0] == "skipped 7 of 10 val images: unreadable; the first 5"
    assert printed[1:6] == [f"  {path}: not an image PIL can read" for path in broken[:5]]
    assert printed[6].startswith("metric")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (saved["images_scored"], saved["captions_scored"]) == (3, 9)
    assert saved["skipped"] == [{"file": str(path), "reason": "not an image PIL can read"} for path in broken]
    assert list(saved["results"]) == ["zero-shot"]


def test_all_unreadable_eval_set_is_a_clear_error(tiny_clip_dir, colour_data, capsys):
    broken = _val_images(colour_data)
    _corrupt(broken)
    code = main(["eval", "--model.name", str(tiny_clip_dir), "--data.path", str(colour_data)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"all {len(broken)} val images are unreadable, nothing to score" in err
    for path in broken:
        assert f"{path}: not an image PIL can read" in err
    assert "need at least one image" not in err


def test_train_check_prints_skips_and_the_report_lists_a_shared_file_once(tiny_clip_dir, tmp_path, capsys):
    from cliptune.config import load_config
    from cliptune.training.recipe import Trainer

    data = make_image_folder_dataset(tmp_path / "data", n_images=12)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    shared = records[0]["image"]  # a train image that val uses as well
    records.append({"image": shared, "captions": ["the same file again"], "split": "val"})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    _corrupt([data.parent / shared])
    config = load_config(None, {"model.name": str(tiny_clip_dir), "data.path": str(data), "lora.r": 2,
                                "train.output_dir": str(tmp_path / "run"), "train.max_steps": 1,
                                "train.micro_batch_size": 4, "train.grad_accum_steps": 1, "train.save_every": 0,
                                "data.num_workers": 0})
    trainer = Trainer(config, progress=False)
    trainer.setup()
    printed = capsys.readouterr().out.splitlines()
    path = data.parent / shared
    assert printed == ["skipped 1 of 9 train images: unreadable", f"  {path}: not an image PIL can read",
                       "skipped 1 of 4 val images: unreadable", f"  {path}: not an image PIL can read"]
    result = trainer.train()
    assert [item[0] for item in result.bad_images] == [str(path)]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Skipped inputs (1)" in report and report.count(str(path)) == 1
