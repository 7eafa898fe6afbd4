"""The command line refuses what it does not understand, names one concept one way, documents every
config key, uses the device it was given (or says why it cannot), and prints what a user needs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder_dataset
from PIL import Image

from cliptune.apps.cli import build_parser, main
from cliptune.config import ConfigError, load_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _photos(root: Path) -> Path:
    for name, colour in COLOURS.items():
        (root / "holiday").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(root / "holiday" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_clip_dir) -> tuple[Path, Path]:
    """(photo folder, index folder) built with the tiny CLIP through PyTorch."""
    from cliptune.deploy.embedders import TorchEmbedder
    from cliptune.deploy.index import Index

    root = tmp_path_factory.mktemp("cli-index")
    photos = _photos(root / "photos")
    Index.build(photos, root / "index", TorchEmbedder(str(tiny_clip_dir), device="cpu"), progress=False)
    return photos, root / "index"


# -- unknown flags -----------------------------------------------------------------------------------

UNKNOWN = [
    (["export", "--model.name", "m", "--out", "{out}", "--onnxx"], "--onnxx", "did you mean --onnx?"),
    (["index", "{tmp}", "--out", "{out}", "--int-8"], "--int-8", "did you mean --int8?"),
    (["search", "{out}", "a dog", "--kk", "3"], "--kk", "did you mean -k?"),
    (["bench", "--data.path", "x.jsonl", "--shrot"], "--shrot", "did you mean --short?"),
    (["data", "download", "flickr30k", "--out", "{out}", "--revison", "main"], "--revison", "did you mean --revision?"),
    (["data", "pack", "--data.path", "x.jsonl", "--out", "{out}", "--shard-sise", "3"], "--shard-sise",
     "did you mean --shard-size?"),
    (["data", "unpack", "s.tar", "--out", "{out}", "--splt", "val"], "--splt", "did you mean --split?"),
    (["data", "cache", "--data.path", "x.jsonl", "--data.cache_dir", "{out}", "--sise", "64"], "--sise",
     "did you mean --size?"),
    (["eval", "--data.path", "x.jsonl", "--out", "{out}", "--scale", "0,1"], "--scale", "did you mean --scales?"),
    (["demo", "--out", "{out}", "--quik"], "--quik", "did you mean --quick?"),
    (["train", "--train.output_dir", "{out}", "--train.lrr", "1"], "train.lrr", "did you mean 'train.lr'?"),
    # A real config key that the command has no use for is not silently accepted either.
    (["eval", "--data.path", "x.jsonl", "--out", "{out}", "--train.lr", "1"], "--train.lr",
     "cliptune eval does not use this setting"),
]


@pytest.mark.parametrize("argv,flag,hint", UNKNOWN, ids=[" ".join(a[:2]) + " " + f for a, f, _ in UNKNOWN])
def test_an_unknown_flag_exits_2_naming_it_and_the_nearest_valid_one(argv, flag, hint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(out=out, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and hint in err, err
    assert not out.exists()  # refused before doing anything


RENAMED = [
    (["bench", "--data.path", "x.jsonl", "--batch", "4"], "--train.micro_batch_size"),
    (["index", "p", "--out", "o", "--onnx", "x", "--batch-size", "4"], "--train.eval_batch_size"),
    (["index", "p", "--out", "o", "--model.name", "m", "--device", "cpu"], "--train.device"),
    (["export", "--model.name", "m", "--out", "o", "--onnx", "--quantize"], "--int8"),
    (["export", "--model.name", "m", "--out", "o", "--eval-data", "d.json"], "--data.path"),
    (["eval", "--model", "m"], "--model.name"),
    (["data", "cache", "--data", "d.jsonl"], "--data.path"),
]


@pytest.mark.parametrize("argv,new", RENAMED, ids=[a[0] + " " + a[-2] for a, _ in RENAMED])
def test_an_old_spelling_is_refused_pointing_at_the_one_name(argv, new, capsys):
    assert main(argv) == 2
    assert f"did you mean {new}?" in capsys.readouterr().err


def _leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    leaves = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                leaves.update(_leaf_parsers(child, f"{prefix}{name} "))
    return leaves or {prefix.strip(): parser}


def test_one_name_per_concept_in_every_subcommand():
    # model, annotations, micro-batch, encoding batch, device, int8, workers, image count: each has one
    # spelling (its config key, or --int8), whichever subcommand takes it.
    retired = {"--model", "--data", "--eval-data", "--batch", "--batch-size", "--eval-batch", "--device",
               "--quantize", "--workers", "--max-images"}
    leaves = _leaf_parsers(build_parser())
    assert {"train", "eval", "demo", "export", "index", "search", "bench", "data cache", "data pack"} <= set(leaves)
    for name, parser in leaves.items():
        flags = {s for action in parser._actions for s in action.option_strings}
        assert not flags & retired, (name, flags & retired)
    for flag, commands in {"--model.name": ["train", "eval", "export", "index", "bench"],
                           "--data.path": ["train", "eval", "export", "demo", "bench", "data cache", "data pack"],
                           "--train.device": ["train", "eval", "index", "bench"],
                           "--train.eval_batch_size": ["train", "eval", "export", "index", "bench"],
                           "--int8": ["export", "index"]}.items():
        for command in commands:
            assert flag in {s for a in leaves[command]._actions for s in a.option_strings}, (command, flag)
    # Same default everywhere: index used to default to cpu where bench and train said auto.
    assert load_config(None, {}).train.device == "auto"


# -- search and index inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, -3])
def test_search_k_below_1_is_a_one_line_error(indexed, k, capsys):
    from cliptune.deploy.index import Index

    _, index = indexed
    with pytest.raises(ValueError, match=rf"k: {k} must be an integer >= 1"):
        Index.load(index).search("a red photo", k=k)
    assert main(["search", str(index), "a red photo", "-k", str(k)]) == 2
    err = capsys.readouterr().err
    assert f"-k {k}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_search_refuses_an_image_path_that_does_not_exist(indexed, tmp_path, capsys):
    from cliptune.deploy.index import Index

    photos, index = indexed
    missing = photos / "holiday" / "rde.png"
    with pytest.raises(ValueError, match="image query .*rde.png: no such file"):
        Index.load(index).search(str(missing))
    with pytest.raises(ValueError, match="no such file"):
        Index.load(index).search("holiday/red")  # a path separator and no spaces: a path
    assert main(["search", str(index), str(missing)]) == 2
    assert "rde.png: no such file" in capsys.readouterr().err
    # What still works: a sentence with a slash in it, and an image that exists (it finds itself first).
    assert len(Index.load(index).search("a red and/or green photo", k=2)) == 2
    assert Path(Index.load(index).search(str(photos / "holiday" / "blue.png"), k=1)[0][0]).name == "blue.png"


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_search_refuses_an_empty_query(indexed, query, capsys):
    from cliptune.deploy.index import Index

    _, index = indexed
    with pytest.raises(ValueError, match="query is empty"):
        Index.load(index).search(query)
    assert main(["search", str(index), query]) == 2
    assert "query is empty" in capsys.readouterr().err


def test_index_on_a_missing_folder_is_refused_and_leaves_nothing(tiny_clip_dir, tmp_path, capsys):
    from cliptune.deploy.embedders import TorchEmbedder
    from cliptune.deploy.index import Index

    out = tmp_path / "idx"
    assert main(["index", str(tmp_path / "no-photos"), "--out", str(out), "--model.name", str(tiny_clip_dir)]) == 2
    assert "no-photos: no such folder" in capsys.readouterr().err
    assert not out.exists()
    embedder = TorchEmbedder(str(tiny_clip_dir), device="cpu")
    with pytest.raises(ValueError, match="no-photos: no such folder"):
        Index.build(tmp_path / "no-photos", out, embedder, progress=False)
    assert not out.exists()
    # A folder of nothing but unreadable images: the error names one, and no half-built index stays.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"no readable images \(1 unreadable, e.g. a.jpg"):
        Index.build(tmp_path / "broken", out, embedder, progress=False)
    assert not out.exists()


# -- --help from the config dataclasses -----------------------------------------------------------------

def _squeezed(text: str) -> str:
    return "".join(text.split())  # argparse wraps help text at the terminal width


def test_train_help_lists_every_config_key_with_its_default_and_doc(capsys):
    from cliptune.config_flags import config_keys

    assert main(["train", "--help"]) == 0
    shown = _squeezed(capsys.readouterr().out)
    for key in config_keys():
        assert _squeezed(f"--{key.dotted}") in shown, key.dotted
        assert key.doc and _squeezed(key.doc) in shown, key.dotted
    for line in ("--train.lr FLOAT Peak AdamW learning rate. (default: 0.0001)",
                 "--lora.vision {lora,frozen,full} Vision tower:",
                 "`frozen` (untouched), or `full` (every weight trained). (default: lora)",
                 "--train.max_steps INT? Stop after this many optimizer steps (overrides epochs when smaller). "
                 "(default: null)"):
        assert _squeezed(line) in shown, line


def test_eval_help_lists_the_keys_eval_uses_and_no_others(capsys):
    assert main(["eval", "--help"]) == 0
    shown = _squeezed(capsys.readouterr().out)
    for flag in ("--model.name", "--data.path", "--data.image_root", "--train.device", "--train.precision",
                 "--train.eval_batch_size"):
        assert _squeezed(flag) in shown, flag
    assert _squeezed("Images or captions encoded at once without gradients") in shown
    for flag in ("--lora.r", "--train.lr", "--train.output_dir", "--data.augment.crop_scale"):
        assert flag not in shown, flag


# -- devices ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda:x", "cuda:", "cudaa", "mps:gpu"])
def test_a_device_string_torch_cannot_parse_is_refused_at_load(device):
    with pytest.raises(ConfigError, match=rf"^train.device: '{device}' is not a device"):
        load_config(None, {"train.device": device})


def _machine_without_gpus(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_train_refuses_a_device_this_machine_does_not_have(device, tiny_clip_dir, tmp_path, monkeypatch, capsys):
    _machine_without_gpus(monkeypatch)
    data = make_image_folder_dataset(tmp_path / "data", n_images=8)
    out = tmp_path / "run"
    code = main(["train", "--model.name", str(tiny_clip_dir), "--data.path", str(data), "--train.device", device,
                 "--train.output_dir", str(out), "--train.max_steps", "1", "--data.num_workers", "0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"train.device: {device} but" in err and ("0 CUDA devices" in err or "MPS" in err)
    assert not out.exists()


def test_a_cuda_index_beyond_the_machines_gpus_is_refused(monkeypatch):
    from cliptune.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"train.device: cuda:7 but this machine has 2 CUDA devices \(cuda:0..cuda:1\)"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_train_on_cpu_runs_on_the_cpu(tiny_clip_dir):
    from cliptune.training.recipe import Trainer

    trainer = Trainer(load_config(None, {"model.name": str(tiny_clip_dir), "train.device": "cpu"}), progress=False)
    trainer.setup_model()
    assert trainer.device == torch.device("cpu") and trainer.precision == "fp32"
    assert {p.device.type for p in trainer.model.parameters()} == {"cpu"}


def test_eval_index_and_bench_resolve_the_device_the_same_way(tiny_clip_dir, tmp_path, monkeypatch):
    from cliptune.apps.bench import BenchOptions, run_bench
    from cliptune.config import DataConfig, ModelConfig
    from cliptune.deploy.embedders import TorchEmbedder
    from cliptune.evaluation.compare import EvalRequest, compare_variants

    _machine_without_gpus(monkeypatch)
    data = make_image_folder_dataset(tmp_path / "data", n_images=8)
    with pytest.raises(ValueError, match="train.device: cuda but this machine has 0 CUDA devices"):
        compare_variants(EvalRequest(model=ModelConfig(name=str(tiny_clip_dir)), data=DataConfig(path=str(data)),
                                     split="train", device="cuda"))
    with pytest.raises(ValueError, match="cuda:1 but this machine has 0 CUDA devices"):
        TorchEmbedder(str(tiny_clip_dir), device="cuda:1")
    with pytest.raises(ValueError, match="mps but MPS"):
        run_bench(BenchOptions(model=str(tiny_clip_dir), data=data, device="mps", short=True))


# -- what a normal run prints ----------------------------------------------------------------------------------

def test_a_normal_train_run_shows_no_library_noise_and_verbose_shows_it(tiny_clip_dir, tmp_path, capsys):
    data = make_image_folder_dataset(tmp_path / "data", n_images=8)

    def run(*first: str, out: str) -> tuple[list[warnings.WarningMessage], str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*first, "train", "--model.name", str(tiny_clip_dir), "--data.path", str(data),
                         "--train.output_dir", str(tmp_path / out), "--train.max_steps", "1",
                         "--train.report", "false", "--data.num_workers", "0"]) == 0
        return caught, capsys.readouterr().err

    caught, err = run(out="quiet")
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert "Loading weights" not in err and "FutureWarning" not in err and "INFO" not in err.replace("INFO cliptune", "")
    assert "training" in err  # cliptune's own progress bar stays
    _, err = run("-v", out="verbose")
    assert "Loading weights" in err


def test_export_index_and_search_print_no_library_info_lines(tiny_clip_dir, tmp_path):
    """In a fresh process, as a user runs them: faiss.loader's import lines, onnxruntime's quantiser
    lines on the root logger, the ONNX tracer's warnings and transformers' loading bars stay out of a
    normal run."""
    photos = _photos(tmp_path / "photos")
    commands = [["export", "--model.name", str(tiny_clip_dir), "--out", str(tmp_path / "exp"), "--onnx", "--int8"],
                ["index", str(photos), "--out", str(tmp_path / "idx"), "--onnx", str(tmp_path / "exp"), "--int8"],
                ["search", str(tmp_path / "idx"), "a red photo", "-k", "2"]]
    script = textwrap.dedent(f"""
        import sys
        from cliptune.apps.cli import main
        for argv in {commands!r}:
            code = main(argv)
            if code:
                sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "exported to" in proc.stdout and "indexed 4 photos" in proc.stdout
    for noise in ("faiss.loader", "Quantization parameters", "INFO root", "WARNING root", "Loading weights",
                  "FutureWarning", "TracerWarning"):
        assert noise not in proc.stderr, proc.stderr
