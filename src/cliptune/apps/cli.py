"""The `cliptune` command: its parser and `main`. What each subcommand then does is in
`cliptune.apps.commands`, which builds the library's own config objects (or plain arguments) from
the parsed flags: the library is never passed an argparse namespace.

One name per concept, in every subcommand: a concept the run config has is spelled as its config
key (`--model.name`, `--data.path`, `--train.device`, `--train.micro_batch_size`,
`--train.eval_batch_size`, `--data.num_workers`...), documented in `--help` from the config
dataclasses' field docstrings and validated by `cliptune.config`; other flags are the command's own
(`--out` for the folder it writes, `--adapter`, `--split`, `--onnx`, `--int8`). A flag a command
does not know is refused (exit 2) with the nearest one it does.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from cliptune.apps import commands
from cliptune.config import ConfigError, UsageError
from cliptune.config_flags import check_key, config_keys, describe_type, parse_flag_value

# -- config keys as flags -----------------------------------------------------------------------------

_KEY = "config_key:"  # argparse dest prefix of a `--section.key` flag


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value) if value == "" else str(value)


def _add_config_flags(parser: argparse.ArgumentParser, patterns: tuple[str, ...] = ("*",),
                      required: tuple[str, ...] = (), helps: dict[str, str] | None = None) -> None:
    """`--section.key VALUE` for every config key matching one of `patterns` (fnmatch), documented from
    the dataclass field docstrings and grouped by section. Only flags given on the command line are
    set, so a `--config` YAML keeps its values for the rest. `helps` replaces a key's help text
    where the command gives it another default or a narrower meaning."""
    helps = helps or {}
    groups: dict[str, Any] = {}
    for key in config_keys():
        if not any(fnmatch.fnmatchcase(key.dotted, pattern) for pattern in patterns):
            continue
        section = key.dotted.split(".", 1)[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} settings")
        text = helps.get(key.dotted) or (f"{key.doc} (required)" if key.dotted in required
                                         else f"{key.doc} (default: {_show(key.default)})")
        groups[section].add_argument(f"--{key.dotted}", dest=_KEY + key.dotted, metavar=describe_type(key.type),
                                     default=argparse.SUPPRESS, required=key.dotted in required,
                                     help=text.replace("%", "%%"))


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `--section.key` flags on the command line, as config overrides."""
    return {dest[len(_KEY):]: parse_flag_value(dest[len(_KEY):], value)
            for dest, value in vars(args).items() if dest.startswith(_KEY)}


class _Parser(argparse.ArgumentParser):
    """No abbreviations: `--model` must not quietly mean `--model.name`, nor `--onn` `--onnx`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


# The keys `cliptune eval` uses: the base model, where the annotations are and how to read them,
# and how to encode. LoRA and optimiser settings come with each adapter; passing one would do nothing.
EVAL_KEYS = ("model.*", "data.path", "data.format", "data.image_root", "data.max_images", "data.max_image_pixels",
             "train.eval_batch_size", "train.device", "train.precision")
EVAL_HELP = {"data.path": "Annotations to score (any format train reads). (default: data.path of --config)"}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cliptune", description="LoRA fine-tuning for CLIP-family models.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' own messages, warnings and progress bars, and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    keys_note = ("Settings are config keys, spelled --section.key VALUE as in the YAML; a flag wins over "
                 "--config, which wins over the defaults shown.")

    train = sub.add_parser("train", help="fine-tune with LoRA (any config key: --section.key value)",
                           usage="cliptune train [--config YAML] [--dry-run] [--resume] [--section.key VALUE ...]",
                           description="Fine-tune with LoRA. " + keys_note)
    train.add_argument("--config", type=Path, help="YAML config (sections model, lora, data, train)")
    train.add_argument("--dry-run", action="store_true", help="load the model, print parameters and plan, exit")
    train.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in output_dir")
    _add_config_flags(train)
    train.set_defaults(handler=commands.train, parser=train)

    evaluate = sub.add_parser("eval", help="retrieval R@K of a base model, adapters and adapter scales, side by side",
                              usage="cliptune eval [--config YAML] [--adapter [NAME=]PATH ...] [--scales S,S] "
                              "[--split SPLIT] [--classify-folder DIR] [--out DIR] [--section.key VALUE ...]",
                              description="Score a base model, its adapters and adapter scales with the standard "
                              "retrieval protocol. " + keys_note)
    evaluate.add_argument("--config", type=Path, help="YAML config; its model, data and train (device, precision, "
                          "eval_batch_size) settings are used")
    evaluate.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                          help="adapter folder, repeatable; its column is labelled NAME, or the run folder's name")
    evaluate.add_argument("--scales", help="adapter scales to compare, e.g. 0,0.5,1 (0 = zero-shot)")
    evaluate.add_argument("--split", help="split to score (default: data.val_split, 'val')")
    evaluate.add_argument("--classify-folder", help="labelled image folder (one sub-folder per class) for a "
                          "zero-shot classification forgetting check")
    evaluate.add_argument("--out", help="write metrics.json and report.md/.html here")
    _add_config_flags(evaluate, EVAL_KEYS, helps=EVAL_HELP)
    evaluate.set_defaults(handler=commands.evaluate, parser=evaluate)

    demo = sub.add_parser("demo", help="offline end-to-end run on packaged pretrained towers",
                          usage="cliptune demo [--out DIR] [--quick] [--section.key VALUE ...]",
                          description="Offline end-to-end run on packaged pretrained towers. Any config key "
                          "overrides the demo's own settings (e.g. --train.max_steps, --data.path).")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (seconds), for smoke tests")
    _add_config_flags(demo, helps={
        "data.path": "Annotations (any format train reads) instead of the generated scenes. (default: the scenes)",
        "model.name": "Base model. (default: the packaged towers composed into OUT/base-model)",
        "train.output_dir": "Run folder. (default: OUT/run)"})
    demo.set_defaults(handler=commands.demo, parser=demo)

    export = sub.add_parser("export", help="merge an adapter into its base model; optionally ONNX and int8")
    export.add_argument("--adapter", help="adapter folder to merge (default: export the base model)")
    export.add_argument("--out", required=True, help="export folder")
    export.add_argument("--onnx", action="store_true", help="also write onnx/image_encoder.onnx, text_encoder.onnx")
    export.add_argument("--int8", action="store_true", help="with --onnx: also int8 (dynamic) versions of the encoders")
    export.add_argument("--metrics", help="metrics.json for the model card (default: next to the adapter's run)")
    export.add_argument("--split", help="with --data.path: split to measure (default: data.val_split, 'val')")
    _add_config_flags(export, ("model.name", "data.path", "data.format", "data.image_root", "data.max_images",
                               "train.eval_batch_size"), required=("model.name",), helps={
        "model.name": "Base model: hub id or folder. (required)",
        "data.path": "With --int8: annotations to measure int8's R@1 change and speed-up on. (default: none)",
        "data.max_images": "Measure on the first N images only. (default: null, all)"})
    export.set_defaults(handler=commands.export, parser=export)

    index = sub.add_parser("index", help="embed a photo folder (recursively) into a searchable FAISS index")
    index.add_argument("photos", help="folder of photos")
    index.add_argument("--out", required=True, help="index folder; one indexed before is updated: new and changed "
                       "photos embedded, deleted ones dropped, the rest re-used (an interrupted build resumes)")
    index.add_argument("--adapter", help="adapter folder on top of --model.name")
    index.add_argument("--onnx", help="ONNX export folder (onnxruntime, no torch)")
    index.add_argument("--int8", action="store_true", help="with --onnx: use the int8 encoders")
    index.add_argument("--approximate", choices=["hnsw", "ivf"], help="approximate index (default exact)")
    index.add_argument("--nprobe", type=int, help="with --approximate ivf: lists searched per query, kept in "
                       "meta.json (default: 32; more finds more of the true best, slower)")
    index.add_argument("--shard-size", type=int, default=256,
                       help="images per resumable shard; under torchrun shard i goes to rank i %% world size "
                       "(default: 256)")
    _add_config_flags(index, ("model.name", "train.device", "train.eval_batch_size"), helps={
        "model.name": "Base model or merged export folder, run with PyTorch (or give --onnx). (default: none)"})
    index.set_defaults(handler=commands.index, parser=index)

    search = sub.add_parser("search", help="the photos of an index that best match a sentence or an image")
    search.add_argument("index", help="index folder from `cliptune index`")
    search.add_argument("query", help="a sentence, or the path of an image (a word ending in an image suffix, or "
                        "with a / and no spaces, is a path and must exist)")
    search.add_argument("-k", type=int, default=5, help="number of results (default: 5)")
    search.set_defaults(handler=commands.search, parser=search)

    serve = sub.add_parser("serve", help="a search page and JSON API over an index (FastAPI on uvicorn)",
                           description="Serve an index: a search page at http://HOST:PORT/ and a JSON API "
                           "(/api/search, /api/similar, /openapi.json). Binds 127.0.0.1; another address needs "
                           "--token. A rebuilt index (cliptune index ... --out INDEX) is picked up without a restart.")
    serve.add_argument("index", help="index folder from `cliptune index`")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                       "any other needs --token)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--token", help="require `Authorization: Bearer TOKEN` on the API and files (or set "
                       "CLIPTUNE_TOKEN, which other users cannot read from the process list); open the page once "
                       "as /?token=TOKEN")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest query photo, in MB (default: 10)")
    serve.add_argument("--max-k", type=int, default=100, help="most results one query may ask for (default: 100)")
    serve.add_argument("--thumbnails", help="thumbnail cache folder (default: INDEX/thumbnails)")
    _add_config_flags(serve, ("data.max_image_pixels",))
    serve.set_defaults(handler=commands.serve, parser=serve)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    download = data_sub.add_parser("download", help="fetch a dataset from the Hugging Face hub and lay it out")
    download.add_argument("dataset", choices=["flickr30k"])
    download.add_argument("--out", default="data/flickr30k", help="target folder (default: data/flickr30k)")
    download.add_argument("--revision", help="hub revision of the dataset to pin")
    download.set_defaults(handler=commands.data_download, parser=download)

    cache = data_sub.add_parser("cache", help="decode and resize every image once into a memory-mapped cache")
    cache.add_argument("--config", type=Path, help="YAML config: its data section (and data.cache_dir) are used")
    cache.add_argument("--size", type=int, default=256, help="side of the cached squares: the model input or a "
                       "little more (256 for 224-px models, so random crops keep room) (default: 256)")
    _add_config_flags(cache, ("data.*",), helps={
        "data.cache_dir": "Cache folder to write. (default: data.cache_dir of --config)",
        "data.num_workers": "Decoding processes. (default: all cores)"})
    cache.set_defaults(handler=commands.data_cache, parser=cache)

    pack = data_sub.add_parser("pack", help="write a dataset's splits as WebDataset shards (images stored as they are)")
    pack.add_argument("--out", required=True, help="folder for <split>-000000.tar, ...")
    pack.add_argument("--splits", default="train,val", help="comma-separated splits to pack (default: train,val)")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    _add_config_flags(pack, ("data.path", "data.format", "data.image_root", "data.max_images"),
                      required=("data.path",))
    pack.set_defaults(handler=commands.data_pack, parser=pack)

    unpack = data_sub.add_parser("unpack", help="extract WebDataset shards to images/ + captions.jsonl")
    unpack.add_argument("shards", help="shard pattern, e.g. 'shards/val-{000000..000004}.tar'")
    unpack.add_argument("--out", required=True, help="target folder (captions.jsonl is appended to)")
    unpack.add_argument("--split", default="train", help="split recorded for samples whose json names none "
                        "(default: train)")
    unpack.set_defaults(handler=commands.data_unpack, parser=unpack)

    bench = sub.add_parser("bench", help="speed of cliptune's path beside the naive loop, as one JSON object",
                           usage="cliptune bench --data.path PATH [--short] [--steps N] [--sweep] [--trainer-only] "
                           "[--loader-only] [--cache-size N] [--section.key VALUE ...]")
    bench.add_argument("--short", action="store_true", help="tiny step counts (a smoke test, < 1 min on a CPU)")
    bench.add_argument("--steps", type=int, default=None,
                       help="timed steps per measurement (default 6; 1 with --short)")
    bench.add_argument("--sweep", action="store_true", help="also time channels-last and torch.compile")
    bench.add_argument("--trainer-only", action="store_true",
                       help="only the seed notebook's loop vs cliptune's Trainer (exact and plain accumulation)")
    bench.add_argument("--loader-only", action="store_true",
                       help="only the input pipeline, no model: pairs/s per DataLoader worker from JPEGs, the image "
                       "cache, and the cache + device augmentation, and the workers 10k pairs/s needs")
    bench.add_argument("--cache-size", type=int, default=None, help="side of the cached squares (default input*8/7)")
    _add_config_flags(bench, ("model.name", "data.path", "data.cache_dir", "train.device", "train.micro_batch_size",
                              "train.eval_batch_size", "data.num_workers", "lora.*"), helps={
        "data.cache_dir": "With --loader-only: an image cache whose rows are the squares device augmentation "
                          "starts from. (default: a temporary one at --cache-size)",
        "model.name": "CLIP model to time. (default: random:clip-vit-b-32, ViT-B/32 shapes with random weights)",
        "data.path": "Annotations whose train split is timed, or a folder with COCO's captions_train.json "
                     "and its images (the README's figures: ../shared/data/coco-mini). (required)",
        "train.eval_batch_size": "Evaluation batch. (default: 32)",
        "data.num_workers": "DataLoader workers of cliptune's end-to-end path. (default: 0)"})
    bench.set_defaults(handler=commands.bench, parser=bench)

    sweep = sub.add_parser("sweep", help="trials of training runs over a search space of config keys (Optuna)",
                           usage="cliptune sweep --space YAML --out DIR [--config YAML] [--objective METRIC] "
                           "[--sampler {auto,grid,tpe,random}] [--trials N] [--max-minutes M] [--storage URL] "
                           "[--study NAME] [--classify-folder DIR] [--section.key VALUE ...]",
                           description="Run trials, each a training run scored on the val split, over the settings "
                           "of a search space file; a stopped sweep resumes with the same command. The base config "
                           "is --config and the --section.key flags (" + keys_note + ") See docs/sweep.md.")
    sweep.add_argument("--space", type=Path, required=True,
                       help="search space YAML: swept config keys, ranges and named choices (docs/sweep.md)")
    sweep.add_argument("--out", required=True, help="sweep folder: trials/NNNN run folders, trials.csv/.json, "
                       "report.md/.html, study.db")
    sweep.add_argument("--config", type=Path, help="YAML config every trial starts from")
    sweep.add_argument("--objective", default="rsum",
                       help="val-split metric to optimise, e.g. rsum, image_to_text_R@1, val_loss (default: rsum)")
    sweep.add_argument("--sampler", choices=["auto", "grid", "tpe", "random"], default="auto",
                       help="grid: every combination of the lists; tpe or random: Optuna's samplers, which also "
                       "take {low, high} ranges (default: auto, grid when the space has no range)")
    sweep.add_argument("--trials", type=int, help="trials in the study in all, complete or failed (a resumed "
                       "sweep runs the rest) (default: the grid's size)")
    sweep.add_argument("--max-minutes", type=float, help="start no new trial after this many minutes")
    sweep.add_argument("--storage", help="Optuna storage URL shared by the machines of one sweep, e.g. "
                       "postgresql://user:password@host/db (default: sqlite:///OUT/study.db)")
    sweep.add_argument("--study", help="study name in the storage (default: the --out folder's name)")
    sweep.add_argument("--classify-folder", help="labelled image folder (one sub-folder per class): also record "
                       "forgetting, as cliptune eval --classify-folder measures it")
    _add_config_flags(sweep)
    sweep.set_defaults(handler=commands.sweep, parser=sweep)

    for command in (train, evaluate, demo, export, index, search, serve, download, cache, pack, unpack, bench,
                    sweep):
        # Also after the subcommand (`cliptune train ... -v`); SUPPRESS keeps a top-level -v.
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="as cliptune -v")
    return parser


# Spellings that earlier versions used, to point a user at today's name (they are not accepted).
RENAMED = {"--model": "--model.name", "--data": "--data.path", "--eval-data": "--data.path",
           "--batch": "--train.micro_batch_size", "--batch-size": "--train.eval_batch_size",
           "--eval-batch": "--train.eval_batch_size", "--device": "--train.device", "--quantize": "--int8",
           "--workers": "--data.num_workers", "--max-images": "--data.max_images", "--steps": "--train.max_steps",
           "--out": "--data.cache_dir"}


def _unknown_message(command: argparse.ArgumentParser, unknown: list[str]) -> str:
    """What is wrong with the first argument `command` does not take, and the nearest one it does."""
    flag = next((u for u in unknown if u.startswith("-")), None)
    if flag is None:
        return f"unrecognized argument {unknown[0]!r}"
    name = flag.split("=", 1)[0]
    flags = [s for action in command._actions for s in action.option_strings]  # argparse has no public list
    takes_keys = any(f.startswith("--") and "." in f for f in flags)
    if takes_keys and name.startswith("--") and "." in name:
        try:
            check_key(name[2:])
        except ConfigError as err:
            return str(err)  # config's own did-you-mean, over every key
    close = [RENAMED[name]] if RENAMED.get(name) in flags else difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    if name.startswith("--") and "." in name:
        return f"unrecognized argument {name}: {command.prog} does not use this setting{hint}"
    return f"unrecognized argument {name}{hint}"


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (pytest swaps it between tests)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_output(verbose: bool, libraries: bool = True) -> None:
    """A normal run shows cliptune's own messages (INFO and up) and the libraries' errors. The
    libraries' INFO and WARNING chatter (faiss.loader's import lines, onnxruntime's quantiser logging
    to the root logger), transformers' progress bars and developer-facing FutureWarnings show with
    -v only: they address the libraries' developers, and what a user must know cliptune says itself.
    `libraries`: also set transformers' own logging (importing transformers is slow; search does without it)."""
    root = logging.getLogger()
    if not any(isinstance(h, _Console) for h in root.handlers):
        console = _Console()
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(console)
    root.setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("cliptune").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    if libraries:
        from transformers.utils import logging as hf_logging

        if verbose:
            hf_logging.set_verbosity_warning()
            hf_logging.enable_progress_bar()
        else:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()  # "Loading weights" bars; also turns off the hub's...
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()  # ...whose download bars a user waiting on a download wants


def _index_embeds_with_onnx(index_dir: str) -> bool:
    """Whether an index's meta.json names the ONNX embedder: then serving it needs neither torch nor
    transformers, and the server starts without importing them."""
    import json

    try:
        meta = json.loads((Path(index_dir) / "meta.json").read_text(encoding="utf-8"))
        return meta["embedder"]["kind"] == "onnx"
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not an index: `serve` says so itself


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            args.parser.error(_unknown_message(args.parser, unknown))
    except SystemExit as stop:  # argparse's usage errors (2) and --help (0), already printed
        return int(stop.code or 0)
    light = (args.command in ("search", "data") or (args.command == "index" and args.onnx)
             or (args.command == "serve" and _index_embeds_with_onnx(args.index)))
    configure_output(args.verbose, libraries=not light)
    try:
        return args.handler(args, _config_overrides(args))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
