"""The public Python API (`import cliptune`): lazy names that cost no torch until one needs it, and the
README's Python example run as written on tiny models."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cliptune

REPO = Path(__file__).resolve().parents[1]
INIT = Path(cliptune.__file__)
# What `import cliptune` and the ONNX search path must not load: the training stack, and for plain
# `import cliptune` the search stack too.
TRAINING_STACK = ("torch", "transformers", "peft", "accelerate", "safetensors")
SEARCH_STACK = ("faiss", "onnxruntime", "tokenizers", "matplotlib", "numpy", "PIL")


def _run_python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, check=True,
                          cwd=REPO)


def test_import_cliptune_imports_no_torch():
    # -X importtime prints one "import time: self | cumulative | module" line per module imported.
    out = _run_python("import cliptune", "-X", "importtime")
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "cliptune" in imported, out.stderr[-2000:]  # the parser really read the modules
    heavy = sorted(m for m in imported if m.split(".")[0] in TRAINING_STACK + SEARCH_STACK)
    assert not heavy, f"`import cliptune` imported {heavy[:10]}"


def test_search_names_import_no_torch():
    code = ("import sys, cliptune\n"
            "cliptune.Index, cliptune.OnnxEmbedder, cliptune.load_config, cliptune.RunConfig, cliptune.UsageError\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_STACK!r}))")
    assert _run_python(code).stdout.strip() == "[]"


def test_a_torch_name_loads_torch_on_first_use():
    code = "import sys, cliptune\nprint('torch' in sys.modules)\ncliptune.train\nprint('torch' in sys.modules)"
    assert _run_python(code).stdout.split() == ["False", "True"]


def _lazy_map() -> dict[str, tuple[str, str]]:
    return cliptune._LAZY


def test_every_public_name_is_the_object_its_module_defines():
    for name, (module, attribute) in _lazy_map().items():
        assert getattr(cliptune, name) is getattr(importlib.import_module(module), attribute), name
    assert cliptune.export is importlib.import_module("cliptune.deploy.export").export_model
    assert isinstance(cliptune.__version__, str) and re.fullmatch(r"\d+\.\d+\.\d+\S*", cliptune.__version__)


def test_all_dir_lazy_map_and_type_checking_imports_agree():
    """`__all__` (read by linters and IDEs), `dir()`, the run-time map and the TYPE_CHECKING imports (read
    by type checkers) name the same objects: a name added to one and not the others fails here."""
    lazy = _lazy_map()
    assert set(cliptune.__all__) == {*lazy, "__version__"}
    assert len(cliptune.__all__) == len(set(cliptune.__all__))
    assert dir(cliptune) == sorted(cliptune.__all__)
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    seen = {alias.asname or alias.name: (node.module, alias.name)
            for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == lazy


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'cliptune' has no attribute 'trian'"):
        cliptune.trian  # noqa: B018


@pytest.mark.parametrize("call", [lambda: cliptune.train("configs/coco_mini_tiny.yaml"),
                                  lambda: cliptune.evaluate({"model": {"name": "x"}})], ids=["train", "evaluate"])
def test_train_and_evaluate_refuse_what_is_not_a_run_config(call):
    with pytest.raises(cliptune.UsageError, match=r"expected a RunConfig \(cliptune.load_config"):
        call()


def test_train_is_setup_then_train(monkeypatch):
    import cliptune.training.train as module

    calls = []

    class FakeTrainer:
        def __init__(self, config, resume=False, progress=True):
            calls.append(("init", config, resume, progress))

        def setup(self):
            calls.append(("setup",))

        def train(self):
            calls.append(("train",))
            return "result"

    monkeypatch.setattr(module, "Trainer", FakeTrainer)
    config = cliptune.load_config(None, {"model.name": "m"})
    assert cliptune.train(config, resume=True, progress=False) == "result"
    assert calls == [("init", config, True, False), ("setup",), ("train",)]


def test_evaluate_scores_what_the_config_says(monkeypatch, tmp_path):
    """evaluate() hands compare_variants the config's model, data, batch size, device and precision,
    the val split unless told, adapters labelled by run name or NAME=PATH, and the scales."""
    import cliptune.evaluation.compare as compare

    requests = []
    monkeypatch.setattr(compare, "compare_variants", lambda request: requests.append(request) or {"ok": {}})
    config = cliptune.load_config(None, {"model.name": "m", "data.path": "d/captions_{split}.json",
                                         "data.val_split": "dev", "train.eval_batch_size": 7,
                                         "train.device": "cpu", "train.precision": "fp32"})
    assert cliptune.evaluate(config, adapters=[tmp_path / "runA" / "adapter", "b=other/adapter"],
                             scales=(0, 1), out_dir=tmp_path / "out") == {"ok": {}}
    cliptune.evaluate(config, split="test")
    first, second = requests
    assert (first.model, first.data, first.split) == (config.model, config.data, "dev")
    assert (first.batch_size, first.device, first.precision) == (7, "cpu", "fp32")
    assert [(a.label, a.path) for a in first.adapters] == [("runA", tmp_path / "runA" / "adapter"),
                                                           ("b", Path("other/adapter"))]
    assert first.scales == [0, 1] and first.out_dir == tmp_path / "out"
    assert second.split == "test" and second.adapters == [] and second.out_dir is None
    with pytest.raises(cliptune.UsageError, match="data.path is empty"):
        cliptune.evaluate(cliptune.load_config(None, {"model.name": "m"}))


# -- the README's Python example --------------------------------------------------------------------


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        if current is None and re.fullmatch(r"\s*```python\s*", line):
            current, start = [], number + 1
        elif current is not None and re.fullmatch(r"\s*```\s*", line):
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_python_blocks_are_found():
    markdown = "a\n```python\nx = 1\n```\n```bash\ny\n```\n```python\nz = 2\nw = 3\n```\n"
    assert python_blocks(markdown) == [(3, "x = 1\n"), (9, "z = 2\nw = 3\n")]


def test_readme_python_example_runs(tmp_path, tokenizer, monkeypatch, capsys):
    """The README's ```python block, executed as written in a folder laid out like tests/test_docs.py's
    (a tiny CLIP at openai/clip-vit-base-patch32, generated COCO-style data at ../shared/data/coco-mini):
    it trains, evaluates, exports to ONNX and searches the photos."""
    import torch
    from test_docs import _template

    (start, code), = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len([line for line in code.splitlines() if line.strip()]) <= 16, "the README promises a short example"
    _template(tmp_path, tokenizer)
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits
    try:
        exec(compile(code, f"README.md:{start}", "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    hits = lines[-3:]
    assert len(hits) == 3, lines
    photos = sorted(p.resolve() for p in (tmp_path / "shared" / "data" / "coco-mini" / "images").iterdir())
    cosines = [float(line.split()[0]) for line in hits]
    assert cosines == sorted(cosines, reverse=True) and all(-1 <= c <= 1 for c in cosines), hits
    assert all(Path(line.split(maxsplit=1)[1]).resolve() in photos for line in hits), hits
    assert (tmp_path / "repo" / "runs" / "python" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "repo" / "exports" / "python" / "onnx" / "image_encoder.onnx").is_file()
    assert len(cliptune.Index.load(tmp_path / "repo" / "photos.index").paths) == len(photos)
