"""Docs that run: every command in the ```bash blocks of README.md and docs/*.md is executed here, as
written, so that changing a doc changes a test.

The commands are read from the Markdown itself (`\\` continuations joined, `#` comment and output
lines dropped, trailing comments cut by shlex). Nothing in a command's text is substituted: instead
each doc gets a working directory laid out so the doc's own paths exist, with tiny models and small
generated data:

- `openai/clip-vit-base-patch32/` and `BASE/`: a 2-layer, 32-wide CLIP saved with save_pretrained
  (`from_pretrained` reads a local folder of that name before it would ask the hub);
- `runs/demo/base-model/`: a tiny composed dual encoder, what `cliptune demo` writes there;
- `../shared/data/coco-mini/` (configs/coco_mini_tiny.yaml's path) and `data/coco/`: COCO captions JSON;
- the hub's `nlphuji/flickr30k` files (`flickr_annotations_30k.csv`, `flickr30k-images.zip` holding
  `flickr30k-images/<id>.jpg`), served by a fake `huggingface_hub.hf_hub_download`;
- `$HOME/Pictures/` for `~/Pictures`, `my.yaml` and `runs/x/` (a trained run);
- `benchmarks/`: a copy of the repository's, for `python benchmarks/NAME.py ...` (run by this interpreter);
- no configs/ folder: `--config configs/NAME.yaml` is found among the configs shipped in the package,
  as for a user who installed the wheel (which, tested below, holds them).

A doc's commands run in order in its directory (a later one uses what an earlier one wrote), each as
its own test case named by doc, line and command. A command that cannot run on this machine is listed
in EXEMPT with its reason and shows as skipped; a command that is neither run nor exempt fails, and so
does an exemption no doc needs any more. Sockets may only connect to loopback addresses.
"""

from __future__ import annotations

import ast
import csv
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_clip, save_tiny_dual
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```(\S*)\s*$")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}

# Commands that cannot run on a 2-core CPU machine with no network, by their text (continuations
# joined, comments dropped, words separated by one space). Keep this small: prefer making the
# environment fit the command.
_EIGHT_GPUS = "8 processes, one per GPU: needs 8 GPUs (tests/test_distributed.py runs the same DDP code in 2 gloo processes)"
_EIGHT_GPUS_INDEX = ("8 processes, one per GPU: needs 8 GPUs (tests/test_index.py runs `torchrun --nproc_per_node 2 "
                     "-m cliptune index` on CPU with gloo)")
_TWO_MACHINES = "two machines x 8 GPUs and a master at 10.0.0.1 (not loopback)"
_VIT_B32 = ("times ViT-B/32 shapes (random:clip-vit-b-32, 151M parameters): minutes on 2 cores even with --short; "
            "tests/test_bench.py runs `cliptune bench --short` on a tiny CLIP")
_LOAD = ("12 s of load on a server in its own process (a new Python process, not `cliptune`); "
         "tests/test_serve.py runs the same benchmark with 2 clients x 1 s and checks it has no errors")
EXEMPT: dict[str, str] = {
    "bash scripts/setup.sh && .venv/bin/cliptune demo":
        "creates .venv with pip (network, minutes) and trains the packaged towers for 4 minutes; "
        "tests/test_demo.py runs `cliptune demo --quick`",
    "bash scripts/test.sh": "runs this test suite (and scripts/setup.sh --dev): it would run itself",
    "accelerate launch --num_processes 8 -m cliptune train --config configs/flickr30k_vitb32_lora.yaml": _EIGHT_GPUS,
    "torchrun --nproc_per_node 8 -m cliptune train --config configs/flickr30k_vitb32_lora.yaml": _EIGHT_GPUS,
    "torchrun --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 --nproc_per_node 8 -m cliptune "
    "train --config configs/flickr30k_vitb32_lora.yaml": _TWO_MACHINES,
    "accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 "
    "--num_processes 16 -m cliptune train --config configs/flickr30k_vitb32_lora.yaml": _TWO_MACHINES,
    "torchrun --nproc_per_node 8 -m cliptune index ~/Pictures --out pics.index --model.name BASE": _EIGHT_GPUS_INDEX,
    "accelerate launch --num_processes 8 -m cliptune index ~/Pictures --out pics.index --model.name BASE":
        _EIGHT_GPUS_INDEX,
    "python benchmarks/ann.py": "builds exact, IVF and HNSW indexes of up to 1M 512-d vectors: over half an hour "
                                "on 2 cores; tests/test_index.py runs `python benchmarks/ann.py --short`",
    "cliptune bench --data.path ../shared/data/coco-mini --steps 10": _VIT_B32,
    "cliptune bench --data.path ../shared/data/coco-mini --short": _VIT_B32,
    "cliptune bench --data.path ../shared/data/coco-mini --sweep": _VIT_B32 + "; torch.compile alone took 312 s",
    "cliptune bench --data.path ../shared/data/coco-mini --train.device cuda --train.micro_batch_size 256":
        "needs a CUDA GPU",
    "cliptune serve coco.index": "a server that runs until Ctrl-C; tests/test_serve.py and tests/test_browser.py run "
                                 "it (uvicorn on a loopback port) over a tiny ONNX index",
    "python benchmarks/serve_load.py coco.index --clients 8 --seconds 10 --captions "
    "../shared/data/coco-mini/captions_val.json": _LOAD,
    "python benchmarks/serve_load.py coco.index --clients 8 --seconds 10 --captions "
    "../shared/data/coco-mini/captions_val.json --thumbs": _LOAD,
    "python scripts/serve_screenshot.py coco.index --query a dog --out docs/images/serve.png":
        "needs Debian's chromium, and writes into the repository; tests/test_browser.py drives the same page",
    "cliptune sweep --config configs/flickr30k_vitb32_lora.yaml --space configs/sweep_lora_space.yaml --out "
    "runs/sweep_vitb32": "36 ViT-B/32 training runs on Flickr30k (a download and GPU-days); tests/test_sweep.py "
    "runs sweeps on a tiny CLIP, and this doc's first command the same code on the tiny dual encoder",
    "cliptune sweep --config configs/flickr30k_vitb32_lora.yaml --space configs/sweep_lora_space.yaml --storage "
    "postgresql://sweeper:secret@db-host/sweeps --study vitb32-lora --out runs/sweep_vitb32":
        "needs a PostgreSQL server on another host (and psycopg2); tests/test_sweep.py runs the SQLite storage",
    "python benchmarks/scale.py --markdown":
        "about an hour on 2 busy cores (retrieval_metrics on 100k x 500k, a 1M-vector index); "
        "the `--short` command after it and tests/test_scale_bench.py run the same code at tiny sizes",
}


@dataclass(frozen=True)
class DocCommand:
    doc: str          # path relative to the repository
    block: int        # which shell block of the doc (0, 1, ...)
    line: int         # where the command starts in the doc
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.argv)

    @property
    def label(self) -> str:
        return f"{self.doc}:{self.line}: {' '.join(self.argv[:3])}"


def shell_blocks(markdown: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every fenced block in a shell language."""
    blocks, current, language, start = [], None, None, 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        fence = FENCE.match(line)
        if fence and current is None:
            current, language, start = [], fence.group(1).lower(), number + 1
        elif fence and not fence.group(1):
            if language in SHELL_LANGUAGES:
                blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, "unclosed ``` fence"
    return blocks


def block_commands(doc: str, block: int, start: int, lines: list[str]) -> list[DocCommand]:
    """Join `\\` continuations, drop comment/output lines (`#...`) and trailing comments."""
    commands, pending, first = [], "", start
    for number, line in enumerate(lines, start=start):
        if not pending:
            first = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical, pending = pending + stripped, ""
        if not logical.strip() or logical.lstrip().startswith("#"):
            continue
        commands.append(DocCommand(doc, block, first, tuple(shlex.split(logical, comments=True))))
    assert not pending, f"{doc}:{first}: a `\\` continuation runs off the end of its block"
    return commands


def doc_commands(path: Path) -> list[DocCommand]:
    doc = str(path.relative_to(REPO))
    return [c for block, (start, lines) in enumerate(shell_blocks(path.read_text(encoding="utf-8")))
            for c in block_commands(doc, block, start, lines)]


ALL_COMMANDS = [c for doc in DOCS for c in doc_commands(doc)]


# -- the parser itself ----------------------------------------------------------------------------


def test_parser_joins_continuations_and_drops_comments_and_output():
    markdown = "\n".join([
        "text", "```bash", "# a comment", "cliptune eval --model m \\", "    --data 'a b.csv'   # trailing",
        "#   output: 3 lines", "", "cliptune search i \"a dog\" -k 5", "```", "```python", "cliptune x", "```",
        "```text", "torchrun --nnodes 2", "```"])
    commands = [c for block, (start, lines) in enumerate(shell_blocks(markdown))
                for c in block_commands("d.md", block, start, lines)]
    assert [(c.block, c.line, c.argv) for c in commands] == [
        (0, 4, ("cliptune", "eval", "--model", "m", "--data", "a b.csv")),
        (0, 8, ("cliptune", "search", "i", "a dog", "-k", "5"))]


def test_every_doc_has_its_commands_found():
    # A parser that silently found nothing would make every doc "pass".
    docs_with_commands = {c.doc for c in ALL_COMMANDS}
    assert {"README.md", "docs/deploy.md", "docs/speed.md", "docs/scaling.md"} <= docs_with_commands
    assert len(ALL_COMMANDS) >= 25


def test_every_exemption_is_still_in_a_doc():
    texts = {c.text for c in ALL_COMMANDS}
    stale = [text for text in EXEMPT if text not in texts]
    assert not stale, f"EXEMPT lists commands no doc has any more (remove them): {stale}"


def test_a_command_neither_runnable_nor_exempt_fails():
    unknown = DocCommand("docs/x.md", 0, 3, ("torchrun", "--nproc_per_node", "4", "-m", "cliptune", "train"))
    assert unknown.text not in EXEMPT
    with pytest.raises(pytest.fail.Exception, match=r"docs/x.md:3: torchrun .*add it to EXEMPT with the reason"):
        _run(unknown)


# -- the working directory a doc's commands run in ---------------------------------------------------


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3)
    pixels = np.clip(colour + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _coco(root: Path, splits: dict[str, int]) -> None:
    """COCO captions JSON per split (captions_{split}.json) with its images in images/."""
    seed = 0
    for split, count in splits.items():
        images, annotations = [], []
        for i in range(count):
            seed += 1
            name = f"{split}_{i:012d}.jpg"
            _jpeg(root / "images" / name, seed)
            images.append({"id": seed, "file_name": name})
            annotations += [{"id": seed * 10 + k, "image_id": seed, "caption": f"photo {seed} seen {k} ways"}
                            for k in range(5)]
        (root / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))


def _fake_flickr30k_hub(root: Path) -> None:
    """The two files of the `nlphuji/flickr30k` dataset repo, with their real names and layout."""
    root.mkdir(parents=True)
    rows = [(f"{1000092795 + i}.jpg", split) for i, split in enumerate(["train"] * 8 + ["val"] * 4 + ["test"] * 4)]
    with open(root / "flickr_annotations_30k.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        for i, (name, split) in enumerate(rows):
            captions = [f"picture {i} described in words number {k}" for k in range(5)]
            writer.writerow([json.dumps(captions), json.dumps(list(range(5 * i, 5 * i + 5))), split, name, str(i)])
    with zipfile.ZipFile(root / "flickr30k-images.zip", "w") as archive:
        for i, (name, _) in enumerate(rows):
            archive.write(_jpeg(root / "src" / name, 100 + i), f"flickr30k-images/{name}")


def _template(root: Path, tokenizer) -> None:
    """Everything any doc's paths need, built once and copied per doc."""
    repo = root / "repo"  # no configs/ folder: `--config configs/NAME.yaml` finds the ones shipped in the package
    save_tiny_clip(repo / "openai" / "clip-vit-base-patch32", tokenizer)
    save_tiny_clip(repo / "BASE", tokenizer, seed=1)
    save_tiny_dual(repo / "runs" / "demo" / "base-model", tokenizer)
    shutil.copytree(REPO / "benchmarks", repo / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    _coco(root / "shared" / "data" / "coco-mini", {"train": 8, "val": 4})
    _coco(repo / "data" / "coco", {"train": 6, "val": 4})
    for i, name in enumerate(["dog.jpg", "beach.png", "holiday/cat.jpg", "holiday/sea.webp"]):
        _jpeg(root / "home" / "Pictures" / name, 200 + i)
    (repo / "my.yaml").write_text("model:\n  name: BASE\ndata:\n  path: data/coco/captions_{split}.json\n"
                                  "  cache_dir: cache/my\n", encoding="utf-8")
    _fake_flickr30k_hub(root / "hub")


def _trained_run(output_dir: str) -> None:
    """docs/deploy.md's `runs/x`: a LoRA run on BASE with its adapter/, config.yaml and metrics.json."""
    from cliptune.apps.cli import main

    assert main(["train", "--model.name", "BASE", "--data.path", "data/coco/captions_{split}.json",
                 "--data.num_workers", "0", "--lora.r", "4", "--train.epochs", "1", "--train.micro_batch_size", "4",
                 "--train.grad_accum_steps", "1", "--train.save_every", "0", "--train.output_dir", output_dir]) == 0


# What a doc needs beyond the template, made in the doc's directory before its first command.
EXTRA_SETUP = {"docs/deploy.md": lambda: _trained_run("runs/x")}


@dataclass
class Workspace:
    root: Path
    outcomes: dict[DocCommand, str | None] = field(default_factory=dict)  # None: ran fine; else why it failed

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    def enter(self, monkeypatch) -> None:
        import huggingface_hub

        hub = {p.name: p for p in (self.root / "hub").iterdir() if p.is_file()}

        def fake_hf_hub_download(repo_id, filename, *args, repo_type=None, revision=None, **kwargs):
            if (repo_id, repo_type) != ("nlphuji/flickr30k", "dataset") or filename not in hub:
                raise RuntimeError(f"docs test: the fake hub has no {repo_type} {repo_id}/{filename}")
            return str(hub[filename])

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
        monkeypatch.setenv("HOME", str(self.root / "home"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.chdir(self.repo)


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory, tokenizer):
    template = tmp_path_factory.mktemp("docs-template")
    _template(template, tokenizer)
    made: dict[str, Workspace] = {}

    def get(doc: str, monkeypatch) -> Workspace:
        if doc not in made:
            root = tmp_path_factory.mktemp(doc.replace("/", "-"))
            shutil.copytree(template, root, dirs_exist_ok=True)
            made[doc] = Workspace(root)
            made[doc].enter(monkeypatch)
            if doc in EXTRA_SETUP:
                EXTRA_SETUP[doc]()
        made[doc].enter(monkeypatch)
        return made[doc]

    return get


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded 2-core machine the threads' waiting
    made a tiny EfficientNet run 6x slower (62 s vs 9 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any socket connection to a non-loopback address fails instead of leaving the machine."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock: socket.socket, address) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        host = address[0]
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a host name: resolving it would already ask the network
        if not loopback:
            raise OSError(f"docs test: connection to {host} refused (loopback only)")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


def _run(command: DocCommand) -> None:
    from cliptune.apps.cli import main

    # What the shell does before the program sees its arguments: `~/x` is $HOME/x.
    argv = [os.path.expanduser(word) if word.startswith("~") else word for word in command.argv]
    if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
        code = _run_script(argv[1:])
        assert code == 0, f"{command.label}: `{command.text}` exited {code}"
        return
    if argv[0] != "cliptune":
        pytest.fail(f"{command.label}: no way to run {argv[0]!r} in this test: make it runnable here, or add "
                    "it to EXEMPT with the reason, or fence it as ```text in the doc with a sentence why")
    try:
        code = main(argv[1:])
    except SystemExit as exit_:  # argparse refusing the command line
        code = exit_.code
    assert code == 0, f"{command.label}: `{command.text}` exited {code}"


def _run_script(argv: list[str]) -> int | str | None:
    """`python SCRIPT ARGS` in this interpreter, as `python` runs it: `__main__`, sys.argv = [SCRIPT, ARGS]."""
    import runpy
    import sys

    saved = sys.argv
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = saved
    return 0


def _run_earlier(workspace: Workspace, command: DocCommand) -> None:
    """The doc's commands before `command`, each once per workspace (already done when the cases run in
    order): a later command reads what they wrote (docs/deploy.md's index block uses the export block's
    folder), and a case run alone must see the same directory. A failure earlier in the same block fails
    `command` too; one in an earlier block does not: if `command` needed it, it fails with its own error."""
    for earlier in [c for c in ALL_COMMANDS if c.doc == command.doc]:
        if earlier == command:
            return
        if earlier.text in EXEMPT:
            continue
        if earlier not in workspace.outcomes:
            try:
                _run(earlier)
                workspace.outcomes[earlier] = None
            except (Exception, pytest.fail.Exception) as err:
                workspace.outcomes[earlier] = f"{type(err).__name__}: {err}"
        if workspace.outcomes[earlier] is not None and earlier.block == command.block:
            pytest.fail(f"an earlier command of {command.doc} failed ({earlier.label}): {workspace.outcomes[earlier]}")


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.label for c in ALL_COMMANDS])
def test_doc_command_runs(command: DocCommand, workspaces, monkeypatch):
    if command.text in EXEMPT:
        pytest.skip(f"exempt: {EXEMPT[command.text]}")
    workspace = workspaces(command.doc, monkeypatch)
    _run_earlier(workspace, command)
    if command in workspace.outcomes:  # ran already, as an earlier command of a case run before this one
        assert workspace.outcomes[command] is None, workspace.outcomes[command]
        return
    try:
        _run(command)
    except (Exception, pytest.fail.Exception) as err:
        workspace.outcomes[command] = f"{type(err).__name__}: {err}"
        raise
    workspace.outcomes[command] = None


def test_export_folder_holds_what_deploy_md_lists(workspaces, monkeypatch):
    """Every path in the first column of docs/deploy.md's export-folder table is in the folder its
    `cliptune export` commands wrote."""
    # The export that writes every kind of file the table lists (int8 encoders too).
    exports = [c for c in ALL_COMMANDS if c.doc == "docs/deploy.md" and c.argv[:2] == ("cliptune", "export")
               and "--int8" in c.argv]
    assert exports, "docs/deploy.md has no `cliptune export ... --int8` command any more"
    workspace = workspaces("docs/deploy.md", monkeypatch)
    last = exports[-1]
    _run_earlier(workspace, last)
    if last not in workspace.outcomes:
        _run(last)
        workspace.outcomes[last] = None
    out = workspace.repo / last.argv[last.argv.index("--out") + 1]
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    table = text[text.index("What the export folder holds"):].split("\n\n")[1]
    listed = [name for row in table.splitlines()[2:] for name in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert "preprocessor_config.json" in listed and len(listed) >= 8, listed
    missing = [name for name in listed if not list(out.glob(name))]
    assert not missing, f"docs/deploy.md lists {missing}, which `{last.text}` did not write to {out}"


def test_wheel_ships_the_configs_the_docs_name(tmp_path):
    """A user who installs the wheel runs the README's `--config configs/NAME.yaml` commands: the
    wheel must hold every config a doc command names (built from a copy, so the tree stays clean)."""
    import subprocess
    import sys

    named = {c.argv[c.argv.index("--config") + 1] for c in ALL_COMMANDS if "--config" in c.argv}
    shipped = {name for name in named if name.startswith("configs/")}
    assert "configs/flickr30k_vitb32_lora.yaml" in shipped
    source = tmp_path / "source"
    (source / "src").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src" / "cliptune", source / "src" / "cliptune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # Offline: no index, no build isolation (the venv's setuptools builds it), no pip version check.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("cliptune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(name for name in shipped if f"cliptune/{name}" not in names)
    assert not missing, f"{wheel.name} lacks {missing}"


def test_deploy_md_python_block_runs(workspaces, monkeypatch, capsys):
    """docs/deploy.md's ```python block, executed as written after the doc's commands (it reads their
    export folder and the ~/Pictures photos): both searches print five (path, cosine) hits, best first."""
    from test_api import python_blocks

    commands = [c for c in ALL_COMMANDS if c.doc == "docs/deploy.md" and c.text not in EXEMPT]
    workspace = workspaces("docs/deploy.md", monkeypatch)
    _run_earlier(workspace, commands[-1])
    if commands[-1] not in workspace.outcomes:
        _run(commands[-1])
        workspace.outcomes[commands[-1]] = None
    (start, code), = python_blocks((REPO / "docs" / "deploy.md").read_text(encoding="utf-8"))
    capsys.readouterr()
    exec(compile(code, f"docs/deploy.md:{start}", "exec"), {"__name__": "__deploy_md__"})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2, printed
    photos = sorted(str(p) for p in (workspace.root / "home" / "Pictures").rglob("*") if p.is_file())
    for line in printed:
        hits = ast.literal_eval(line)
        assert len(hits) == min(5, len(photos)), hits
        assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True), hits
        assert all(str(Path(path)) in photos or str(workspace.root / "home" / "Pictures" / path) in photos
                   for path, _ in hits), hits
