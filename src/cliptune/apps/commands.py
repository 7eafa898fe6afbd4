"""What each `cliptune` subcommand does, once `cliptune.apps.cli` has parsed its arguments.

Each handler gets the parsed namespace (the command's own flags: `--out`, `--adapter`, ...) and
`given`, the `--section.key` flags of the command line as config overrides. It builds the library's
typed config objects from them and calls the library; nothing below is passed the namespace.
Returns the exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cliptune.config import ConfigError, UsageError, load_config


def train(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.training.recipe import Trainer

    config = load_config(args.config, given)
    trainer = Trainer(config, resume=args.resume)
    # Under torchrun / accelerate launch every rank runs this; one of them speaks.
    say = print if trainer.accelerator.is_main_process else (lambda *args, **kwargs: None)
    if args.dry_run:
        from cliptune.models.lora import count_adapted_parameters

        # Counted apart from the trainer's model: a random: shape is then built without weights.
        say(count_adapted_parameters(config.model, config.lora))
        # The plan needs the number of training images; reading the annotations is cheap, opening images is not.
        from cliptune.training.data import TrainingData
        from cliptune.training.recipe import TrainingError

        try:
            plan = TrainingData.read(config, trainer.accelerator.num_processes).plan
        except (ValueError, TrainingError) as err:
            say(f"plan: data not readable ({err}); effective batch {config.train.effective_batch_size}")
            return 0
        say(f"{plan.describe()}; accumulation {config.train.accumulation}; output {config.train.output_dir}")
        return 0
    say(trainer.setup_model())
    plan = trainer.setup_data()
    say(plan.describe())
    trainer.setup()
    result = trainer.train()
    say(f"trained {result.steps} steps in {result.train_seconds:.1f} s ({result.pairs_per_second:.1f} pairs/s); "
        f"adapter: {result.adapter_dir}")
    if result.results:
        from cliptune.evaluation.report import format_results_for_terminal

        say(format_results_for_terminal(result.results))
    if result.interrupted:
        say(f"interrupted: resume with  cliptune train --config {result.output_dir / 'config.yaml'} --resume")
        return 130
    return 0


def _scales(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"eval --scales {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None


def evaluate(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.evaluation.compare import EvalRequest, compare_variants, parse_adapter_spec
    from cliptune.evaluation.report import format_results_for_terminal

    config = load_config(args.config, given)
    if not config.data.path:
        raise UsageError("eval: no annotations: give --data.path (or a --config with data.path)")
    request = EvalRequest(
        model=config.model,
        data=config.data,
        split=args.split or config.data.val_split,
        adapters=[parse_adapter_spec(a) for a in args.adapter],
        scales=_scales(args.scales) if args.scales else [1.0],
        classify_folder=Path(args.classify_folder) if args.classify_folder else None,
        batch_size=config.train.eval_batch_size,
        device=config.train.device,
        precision=config.train.precision,
        out_dir=Path(args.out) if args.out else None,
    )
    results = compare_variants(request)
    print(format_results_for_terminal(results))
    if request.out_dir is not None:
        print(f"report: {request.out_dir / 'report.md'}")
    return 0


def demo(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.apps.demo import DemoOptions, run_demo

    load_config(None, given)  # a bad flag fails now, not after composing the towers
    overrides = dict(given)
    options = DemoOptions(out_dir=Path(args.out), data=overrides.pop("data.path", None), quick=args.quick)
    result = run_demo(options, overrides)
    from cliptune.evaluation.report import format_results_for_terminal

    print(format_results_for_terminal(result.results))
    print(f"report: {result.output_dir / 'report.md'} (and report.html)")
    return 0


def export(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.deploy.export import export_model, measure_quantization

    if args.int8 and not args.onnx:
        raise UsageError("export --int8: int8 quantisation applies to the ONNX encoders; add --onnx")
    measuring = [f"--{k}" for k in given if k.startswith("data.") or k == "train.eval_batch_size"]
    measuring += ["--split"] if args.split else []
    if measuring and not args.int8:
        raise UsageError(f"export {' '.join(measuring)}: these measure the int8 encoders; add --onnx --int8")
    if measuring and "data.path" not in given:
        raise UsageError(f"export {' '.join(measuring)}: give --data.path, the annotations to measure int8 on")
    config = load_config(None, given)
    adapter = Path(args.adapter) if args.adapter else None
    result = export_model(config.model.name, Path(args.out), adapter=adapter, onnx=args.onnx, quantize=args.int8,
                          metrics_path=Path(args.metrics) if args.metrics else None)
    weights = {"merged model": "model.safetensors", "image_encoder.onnx": "onnx/image_encoder.onnx",
               "text_encoder.onnx": "onnx/text_encoder.onnx", "image_encoder.int8.onnx": "onnx/image_encoder.int8.onnx",
               "text_encoder.int8.onnx": "onnx/text_encoder.int8.onnx"}
    for label, name in weights.items():
        if name in result.files:
            print(f"{label:24s} {result.files[name] / 1e6:8.2f} MB")
    print(f"exported to {result.out_dir} ({result.size_mb():.1f} MB in all; model card README.md)")
    if "data.path" in given:
        from cliptune.data.readers import read_split

        records, _ = read_split(config.data, args.split or config.data.val_split)
        print(measure_quantization(result.out_dir / "onnx", records, config.train.eval_batch_size).describe())
    return 0


def index(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.deploy.embedders import OnnxEmbedder, TorchEmbedder
    from cliptune.deploy.index import build_index, launched_world_size
    from cliptune.deploy.vector_index import AnnSettings

    if ("model.name" in given) == bool(args.onnx):
        raise UsageError("index: give either --model.name (with optional --adapter) or --onnx")
    if args.onnx and (args.adapter or "train.device" in given):
        raise UsageError("index: --adapter and --train.device apply to --model.name; an --onnx export has the "
                         "adapter merged in and runs on onnxruntime's CPU provider")
    if args.int8 and not args.onnx:
        raise UsageError("index --int8: the int8 encoders are ONNX ones; add --onnx (an export made with --int8)")
    if args.nprobe is not None and args.approximate != "ivf":
        raise UsageError(f"index --nprobe {args.nprobe}: the lists an IVF index searches; add --approximate ivf")
    if not Path(args.photos).expanduser().is_dir():  # Index.build checks it too, after the model has loaded
        raise UsageError(f"index: {args.photos}: no such folder of photos")
    ann = AnnSettings(args.approximate, nprobe=args.nprobe)
    world = launched_world_size()
    if world > 1 and args.onnx:
        # onnxruntime embeds on the CPU, where one process already keeps every core busy; spreading it
        # over processes would need a barrier without torch (which the torch-free install lacks).
        raise UsageError(f"index --onnx under a launcher ({world} processes): the ONNX embedder runs on the CPU, "
                         "which one process already keeps busy; run `cliptune index --onnx` as one process, "
                         "or use --model.name to spread the photos over GPUs")
    config = load_config(None, given)
    batch, device, ranks = config.train.eval_batch_size, config.train.device, None
    if world > 1:
        from cliptune.distributed import LaunchedRanks, rank_device

        ranks, device = LaunchedRanks(), rank_device(device)
    try:
        if args.onnx:
            embedder = OnnxEmbedder(Path(args.onnx), quantized=args.int8, batch_size=batch)
        else:
            embedder = TorchEmbedder(config.model.name, args.adapter, device=device, batch_size=batch)
        index = build_index(Path(args.photos), Path(args.out), embedder, ann, shard_size=args.shard_size,
                            ranks=ranks)
    finally:
        if ranks is not None:
            ranks.close()
    if index is None:  # another rank of a distributed build: rank 0 reports
        return 0
    update, skipped = index.update, index.meta["skipped"]
    print(f"indexed {update.describe()}")
    if update.resumed:
        print(f"  {update.resumed} of them embedded by an interrupted build before this one")
    if len(update.embedded_by_rank) > 1:
        print(f"  embedded on {len(update.embedded_by_rank)} processes: "
              f"{' + '.join(map(str, update.embedded_by_rank))} photos")
    print(f"index: {args.out} ({index.meta['dim']}-d, {ann.describe(index.faiss_index)}); "
          f"{len(skipped)} unreadable skipped")
    for item in skipped[:10]:
        print(f"  skipped {item['reason']}")
    return 0


def search(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.deploy.index import Index, check_query

    if args.k < 1:  # also checked by Index.search; here it costs no index load
        raise UsageError(f"search -k {args.k}: the number of results must be >= 1")
    check_query(args.query)
    index = Index.load(Path(args.index))
    for path, score in index.search(args.query, args.k):
        print(f"{score:7.4f}  {path}")
    return 0


def serve(args: argparse.Namespace, given: dict[str, Any]) -> int:
    import os

    from cliptune.deploy.serve import ServeOptions, create_app, uvicorn_config
    from cliptune.extras import require

    uvicorn = require("uvicorn", "search", "the search server (cliptune serve)")
    if not (Path(args.index) / "meta.json").is_file():
        raise UsageError(f"serve: {args.index}: not an index (no meta.json); build one with `cliptune index`")
    config = load_config(None, given)
    options = ServeOptions(host=args.host, port=args.port, token=args.token or os.environ.get("CLIPTUNE_TOKEN"),
                           max_upload_mb=args.max_upload_mb, max_k=args.max_k,
                           default_k=min(ServeOptions.default_k, max(args.max_k, 1)),
                           max_image_pixels=config.data.max_image_pixels,
                           thumbnail_dir=Path(args.thumbnails) if args.thumbnails else None)
    app = create_app(Path(args.index), options)
    host = f"[{options.host}]" if ":" in options.host else options.host
    print(f"serving {len(app.state.live_index.current().listed)} photos of {args.index} at "
          f"http://{host}:{options.port}/" + ("  (open it once as /?token=<your token>)" if options.token else "")
          + "; Ctrl-C stops", flush=True)
    uvicorn.Server(uvicorn_config(app, options.host, options.port, "info" if args.verbose else "warning")).run()
    return 0


def data_download(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.apps.download import download_flickr30k

    layout = download_flickr30k(Path(args.out), revision=args.revision)
    print(f"images per split: {layout.images_per_split}")
    print("use in a config:\n" + layout.config_lines())
    return 0


def data_cache(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.data.cache import build_cache
    from cliptune.data.readers import read_split

    data = load_config(args.config, given).data
    if not data.path:
        raise UsageError("data cache: no annotations: give --data.path (or a --config with data.path)")
    out = data.cache_dir
    if not out:
        raise UsageError("data cache: no cache folder: give --data.cache_dir (or set data.cache_dir in the config)")
    records = {}
    for split in dict.fromkeys([data.train_split, data.val_split, data.test_split]):
        try:
            records[split], _ = read_split(data, split)
        except ValueError as err:
            print(f"split {split!r} skipped: {err}")
    if not records:
        raise ConfigError("data cache: no split could be read")
    stats = build_cache(records, Path(out), size=args.size, workers=given.get("data.num_workers"),
                        max_pixels=data.max_image_pixels)
    print(stats.describe())
    print(f"train from it with  --data.cache_dir {out}")
    return 0


def data_pack(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.data.readers import read_split
    from cliptune.data.shards import write_webdataset

    data = load_config(None, given).data
    most = 0
    for split in args.splits.split(","):
        records, _ = read_split(data, split)
        shards = write_webdataset(records, str(Path(args.out) / f"{split}-%06d.tar"), args.shard_size, split=split)
        most = max(most, len(shards))
        print(f"{split}: {len(records)} images in {len(shards)} shards")
    # Training reads the train split's range; a val split with fewer shards uses those that exist.
    print(f"train from them with  --data.path '{Path(args.out)}/{{split}}-{{000000..{most - 1:06d}}}.tar'")
    return 0


def data_unpack(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.data.shards import ShardStats, materialize_webdataset

    stats = ShardStats()
    jsonl = materialize_webdataset(args.shards, Path(args.out), split=args.split, stats=stats)
    print(f"{stats.samples} samples extracted to {jsonl}; {len(stats.skipped)} skipped")
    for name, why in stats.skipped[:20]:
        print(f"  skipped {name}: {why}")
    return 0


def bench(args: argparse.Namespace, given: dict[str, Any]) -> int:
    import json

    from cliptune.apps.bench import BenchOptions, run_bench

    if args.loader_only:
        return bench_loader(args, given)
    if "data.cache_dir" in given:
        raise UsageError("bench: --data.cache_dir is read with --loader-only only")
    own = BenchOptions()  # the bench's defaults differ from a training run's where noted in --help
    config = load_config(None, {"model.name": own.model, "train.device": own.device,
                                "train.micro_batch_size": own.batch, "train.eval_batch_size": own.eval_batch,
                                "data.num_workers": own.workers, **given})
    # No default folder: without --data.path the bench refuses (UsageError, exit 2) before loading anything.
    options = BenchOptions(model=config.model.name, data=Path(config.data.path) if config.data.path else None,
                           device=config.train.device,
                           batch=config.train.micro_batch_size, eval_batch=config.train.eval_batch_size,
                           steps=args.steps, short=args.short, sweep=args.sweep, cache_size=args.cache_size,
                           workers=config.data.num_workers, lora=config.lora, trainer_only=args.trainer_only)
    print(json.dumps(run_bench(options), indent=2))
    return 0


def bench_loader(args: argparse.Namespace, given: dict[str, Any]) -> int:
    """`cliptune bench --loader-only`: the input pipeline alone (`cliptune.apps.bench_loader`)."""
    import json

    from cliptune.apps.bench_loader import LoaderBenchOptions, run_loader_bench

    if args.trainer_only or args.sweep or args.steps is not None:
        raise UsageError("bench --loader-only times the input pipeline only: --trainer-only, --sweep and --steps "
                         "do not apply")
    own = LoaderBenchOptions()
    config = load_config(None, {"model.name": own.model, "train.device": own.device,
                                "train.micro_batch_size": own.batch, "data.num_workers": 1, **given})
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else None
    if cache_dir is not None and args.cache_size is not None:
        raise UsageError("bench --loader-only: give --data.cache_dir or --cache-size, not both")
    options = LoaderBenchOptions(model=config.model.name, data=Path(config.data.path) if config.data.path else None,
                                 device=config.train.device, batch=config.train.micro_batch_size,
                                 workers=tuple(sorted({0, 1, config.data.num_workers})), short=args.short,
                                 cache_dir=cache_dir, cache_size=args.cache_size)
    print(json.dumps(run_loader_bench(options), indent=2))
    return 0


def sweep(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from cliptune.sweep.report import describe_params
    from cliptune.sweep.space import load_space
    from cliptune.sweep.study import SweepOptions, run_sweep

    base = load_config(args.config, given)
    options = SweepOptions(
        base=base, space=load_space(args.space, base), out_dir=Path(args.out), objective=args.objective,
        sampler=args.sampler, trials=args.trials, max_minutes=args.max_minutes, storage=args.storage,
        study_name=args.study, classify_folder=Path(args.classify_folder) if args.classify_folder else None,
        verbose=args.verbose)
    result = run_sweep(options)
    if result.best is not None:
        print(f"best: trial {result.best.number} ({describe_params(result.best.params)}): "
              f"{options.objective} {result.best.objective:.4g}")
    print(f"table: {result.out_dir / 'trials.csv'} (and trials.json); report: {result.report} (and report.html)")
    return 130 if result.stopped.startswith("interrupted") else 0
