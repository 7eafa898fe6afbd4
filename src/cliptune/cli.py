"""The `cliptune` command: parses arguments into typed configs, then calls the library.

Nothing below `main` is passed an argparse namespace: each command builds the library's own
config objects (or plain arguments) and hands them over.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cliptune.config import ConfigError, load_config, parse_overrides


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.train import Trainer

    config = load_config(args.config, parse_overrides(extra))
    trainer = Trainer(config, resume=args.resume)
    counts = trainer.setup_model()
    # Under torchrun / accelerate launch every rank runs this; one of them speaks.
    say = print if trainer.accelerator.is_main_process else (lambda *args, **kwargs: None)
    say(counts)
    if args.dry_run:
        # The plan needs the number of training images; reading the annotations is cheap, opening images is not.
        from cliptune.data import read_split
        from cliptune.train import plan_training

        try:
            if config.data.streams_shards:
                from cliptune.streaming import count_shards, expand_shards

                count = count_shards(expand_shards(config.data.path.replace("{split}", config.data.train_split)))
                images, captions = count.samples, count.captions
            else:
                records, _ = read_split(config.data, config.data.train_split)
                images, captions = len(records), sum(len(r.captions) for r in records)
        except ValueError as err:
            say(f"plan: data not readable ({err}); effective batch {config.train.effective_batch_size}")
            return 0
        plan = plan_training(images, captions, config, trainer.accelerator.num_processes)
        say(f"{plan.describe()}; accumulation {config.train.accumulation}; output {config.train.output_dir}")
        return 0
    plan = trainer.setup_data()
    say(plan.describe())
    trainer.setup()
    result = trainer.train()
    say(f"trained {result.steps} steps in {result.train_seconds:.1f} s ({result.pairs_per_second:.1f} pairs/s); "
        f"adapter: {result.adapter_dir}")
    if result.results:
        from cliptune.report import format_results_for_terminal

        say(format_results_for_terminal(result.results))
    if result.interrupted:
        say(f"interrupted: resume with  cliptune train --config {result.output_dir / 'config.yaml'} --resume")
        return 130
    return 0


def _eval(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.compare import EvalRequest, compare_variants
    from cliptune.report import format_results_for_terminal

    config = load_config(args.config, parse_overrides(extra))
    if args.model:
        config.model.name = args.model
    if args.data:
        config.data.path = args.data
    request = EvalRequest(
        model=config.model,
        data=config.data,
        split=args.split or config.data.val_split,
        adapters=[Path(a) for a in args.adapter],
        scales=[float(s) for s in args.scales.split(",")] if args.scales else [1.0],
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


def _demo(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.demo import DemoOptions, run_demo

    options = DemoOptions(out_dir=Path(args.out), data=args.data, steps=args.steps, quick=args.quick)
    result = run_demo(options, parse_overrides(extra))
    from cliptune.report import format_results_for_terminal

    print(format_results_for_terminal(result.results))
    print(f"report: {result.output_dir / 'report.md'} (and report.html)")
    return 0


def _export(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.export import export_model, measure_quantization

    if args.quantize and not args.onnx:
        raise ConfigError("export --quantize: int8 quantisation applies to the ONNX encoders; add --onnx")
    adapter = Path(args.adapter) if args.adapter else None
    result = export_model(args.model, Path(args.out), adapter=adapter, onnx=args.onnx, quantize=args.quantize,
                          metrics_path=Path(args.metrics) if args.metrics else None)
    weights = {"merged model": "model.safetensors", "image_encoder.onnx": "onnx/image_encoder.onnx",
               "text_encoder.onnx": "onnx/text_encoder.onnx", "image_encoder.int8.onnx": "onnx/image_encoder.int8.onnx",
               "text_encoder.int8.onnx": "onnx/text_encoder.int8.onnx"}
    for label, name in weights.items():
        if name in result.files:
            print(f"{label:24s} {result.files[name] / 1e6:8.2f} MB")
    print(f"exported to {result.out_dir} ({result.size_mb():.1f} MB in all; model card README.md)")
    if args.quantize and args.eval_data:
        from cliptune.config import DataConfig
        from cliptune.data import read_split

        records, _ = read_split(DataConfig(path=args.eval_data), args.split)
        if args.max_images:
            records = records[: args.max_images]
        print(measure_quantization(result.out_dir / "onnx", records).describe())
    return 0


def _index(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.search import Index, OnnxEmbedder, TorchEmbedder

    if bool(args.model) == bool(args.onnx):
        raise ConfigError("index: give either --model (with optional --adapter) or --onnx")
    if args.onnx:
        embedder = OnnxEmbedder(Path(args.onnx), quantized=args.int8, batch_size=args.batch_size)
    else:
        embedder = TorchEmbedder(args.model, args.adapter, device=args.device, batch_size=args.batch_size)
    index = Index.build(Path(args.photos), Path(args.out), embedder, approximate=args.approximate,
                        shard_size=args.shard_size)
    skipped = index.meta["skipped"]
    print(f"indexed {len(index.paths)} photos into {args.out} ({index.meta['dim']}-d, "
          f"{args.approximate or 'exact'}); {len(skipped)} unreadable skipped")
    for item in skipped[:10]:
        print(f"  skipped {item['reason']}")
    return 0


def _search(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.search import Index

    index = Index.load(Path(args.index))
    for path, score in index.search(args.query, args.k):
        print(f"{score:7.4f}  {path}")
    return 0


def _data_download(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.download import download_flickr30k

    layout = download_flickr30k(Path(args.out), revision=args.revision)
    print(f"images per split: {layout.images_per_split}")
    print("use in a config:\n" + layout.config_lines())
    return 0


def _data_cache(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.cache import build_cache
    from cliptune.config import DataConfig
    from cliptune.data import read_split

    if bool(args.config) == bool(args.data):
        raise ConfigError("data cache: give either --config or --data")
    data = load_config(args.config, parse_overrides(extra)).data if args.config else DataConfig(path=args.data)
    out = args.out or data.cache_dir
    if not out:
        raise ConfigError("data cache: no output folder: pass --out or set data.cache_dir in the config")
    records = {}
    for split in dict.fromkeys([data.train_split, data.val_split, data.test_split]):
        try:
            records[split], _ = read_split(data, split)
        except ValueError as err:
            print(f"split {split!r} skipped: {err}")
    if not records:
        raise ConfigError("data cache: no split could be read")
    stats = build_cache(records, Path(out), size=args.size, workers=args.workers, max_pixels=data.max_image_pixels)
    print(stats.describe())
    print(f"train from it with  --data.cache_dir {out}")
    return 0


def _data_pack(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.config import DataConfig
    from cliptune.data import read_split
    from cliptune.webdataset_source import write_webdataset

    data = DataConfig(path=args.data)
    most = 0
    for split in args.splits.split(","):
        records, _ = read_split(data, split)
        shards = write_webdataset(records, str(Path(args.out) / f"{split}-%06d.tar"), args.shard_size, split=split)
        most = max(most, len(shards))
        print(f"{split}: {len(records)} images in {len(shards)} shards")
    # Training reads the train split's range; a val split with fewer shards uses those that exist.
    print(f"train from them with  --data.path '{Path(args.out)}/{{split}}-{{000000..{most - 1:06d}}}.tar'")
    return 0


def _data_unpack(args: argparse.Namespace, extra: list[str]) -> int:
    from cliptune.webdataset_source import ShardStats, materialize_webdataset

    stats = ShardStats()
    jsonl = materialize_webdataset(args.shards, Path(args.out), split=args.split, stats=stats)
    print(f"{stats.samples} samples extracted to {jsonl}; {len(stats.skipped)} skipped")
    for name, why in stats.skipped[:20]:
        print(f"  skipped {name}: {why}")
    return 0


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from cliptune.bench import COCO_MINI, BenchOptions, run_bench

    options = BenchOptions(model=args.model, data=Path(args.data) if args.data else COCO_MINI, device=args.device,
                           batch=args.batch, eval_batch=args.eval_batch, steps=args.steps, short=args.short,
                           sweep=args.sweep, cache_size=args.cache_size, workers=args.workers)
    print(json.dumps(run_bench(options), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliptune", description="LoRA fine-tuning for CLIP-family models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune with LoRA (any config key: --section.key value)")
    train.add_argument("--config", type=Path, help="YAML config (sections model, lora, data, train)")
    train.add_argument("--dry-run", action="store_true", help="load the model, print parameters and plan, exit")
    train.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in output_dir")
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("eval", help="retrieval R@K of a base model, adapters and adapter scales, side by side")
    evaluate.add_argument("--config", type=Path, help="YAML config; its model and data sections are used")
    evaluate.add_argument("--model", help="base model: hub id or folder (overrides model.name)")
    evaluate.add_argument("--adapter", action="append", default=[], help="adapter folder (repeatable)")
    evaluate.add_argument("--scales", help="adapter scales to compare, e.g. 0,0.5,1 (0 = zero-shot)")
    evaluate.add_argument("--data", help="annotations (overrides data.path)")
    evaluate.add_argument("--split", help="split to score (default data.val_split)")
    evaluate.add_argument("--classify-folder", help="labelled image folder (one sub-folder per class) for a "
                          "zero-shot classification forgetting check")
    evaluate.add_argument("--out", help="write metrics.json and report.md/.html here")
    evaluate.set_defaults(handler=_eval)

    demo = sub.add_parser("demo", help="offline end-to-end run on packaged pretrained towers")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--data", help="any supported annotations instead of the generated scenes")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (seconds), for smoke tests")
    demo.set_defaults(handler=_demo)

    export = sub.add_parser("export", help="merge an adapter into its base model; optionally ONNX and int8")
    export.add_argument("--model", required=True, help="base model: hub id or folder")
    export.add_argument("--adapter", help="adapter folder to merge (default: export the base model)")
    export.add_argument("--out", required=True, help="export folder")
    export.add_argument("--onnx", action="store_true", help="also write onnx/image_encoder.onnx, text_encoder.onnx")
    export.add_argument("--quantize", action="store_true", help="also int8 (dynamic) versions of the ONNX encoders")
    export.add_argument("--metrics", help="metrics.json for the model card (default: next to the adapter's run)")
    export.add_argument("--eval-data", help="with --quantize: annotations to measure int8's R@1 change and speed-up")
    export.add_argument("--split", default="val", help="split of --eval-data (default val)")
    export.add_argument("--max-images", type=int, help="measure on the first N images only")
    export.set_defaults(handler=_export)

    index = sub.add_parser("index", help="embed a photo folder (recursively) into a searchable FAISS index")
    index.add_argument("photos", help="folder of photos")
    index.add_argument("--out", required=True, help="index folder (resumes an interrupted build)")
    index.add_argument("--model", help="base model or merged export folder (PyTorch)")
    index.add_argument("--adapter", help="adapter folder on top of --model")
    index.add_argument("--onnx", help="ONNX export folder (onnxruntime, no torch)")
    index.add_argument("--int8", action="store_true", help="with --onnx: use the int8 encoders")
    index.add_argument("--approximate", choices=["hnsw", "ivf"], help="approximate index (default exact)")
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--shard-size", type=int, default=256, help="images per resumable shard")
    index.add_argument("--device", default="cpu", help="PyTorch device for --model")
    index.set_defaults(handler=_index)

    search = sub.add_parser("search", help="the photos of an index that best match a sentence or an image")
    search.add_argument("index", help="index folder from `cliptune index`")
    search.add_argument("query", help="a sentence, or the path of an image")
    search.add_argument("-k", type=int, default=5, help="number of results")
    search.set_defaults(handler=_search)
    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    download = data_sub.add_parser("download", help="fetch a dataset from the Hugging Face hub and lay it out")
    download.add_argument("dataset", choices=["flickr30k"])
    download.add_argument("--out", default="data/flickr30k", help="target folder")
    download.add_argument("--revision", help="hub revision to pin")
    download.set_defaults(handler=_data_download)

    cache = data_sub.add_parser("cache", help="decode and resize every image once into a memory-mapped cache")
    cache.add_argument("--config", type=Path, help="YAML config: its data section (and data.cache_dir) are used")
    cache.add_argument("--data", help="annotations instead of a config (data.path)")
    cache.add_argument("--out", help="cache folder (default data.cache_dir)")
    cache.add_argument("--size", type=int, default=256, help="side of the cached squares: the model input or a "
                       "little more (256 for 224-px models, so random crops keep room)")
    cache.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    cache.set_defaults(handler=_data_cache)

    pack = data_sub.add_parser("pack", help="write a dataset's splits as WebDataset shards (images stored as they are)")
    pack.add_argument("--data", required=True, help="annotations (data.path; any format cliptune reads)")
    pack.add_argument("--out", required=True, help="folder for <split>-000000.tar, ...")
    pack.add_argument("--splits", default="train,val", help="comma-separated splits to pack")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    pack.set_defaults(handler=_data_pack)

    unpack = data_sub.add_parser("unpack", help="extract WebDataset shards to images/ + captions.jsonl")
    unpack.add_argument("shards", help="shard pattern, e.g. 'shards/val-{000000..000004}.tar'")
    unpack.add_argument("--out", required=True, help="target folder (captions.jsonl is appended to)")
    unpack.add_argument("--split", default="train", help="split name for samples whose json has none")
    unpack.set_defaults(handler=_data_unpack)

    bench = sub.add_parser("bench", help="speed of cliptune's path beside the naive loop, as one JSON object")
    bench.add_argument("--short", action="store_true", help="tiny step counts (a smoke test, < 1 min on a CPU)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    bench.add_argument("--batch", type=int, default=8, help="training micro-batch (pairs)")
    bench.add_argument("--eval-batch", type=int, default=32, help="evaluation batch")
    bench.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 6; 1 with --short)")
    bench.add_argument("--model", default="random:clip-vit-b-32", help="CLIP model to time (default ViT-B/32 shapes, "
                       "random weights)")
    bench.add_argument("--data", help="folder with COCO captions_train.json and images (default ../shared/data/coco-mini)")
    bench.add_argument("--sweep", action="store_true", help="also time channels-last and torch.compile")
    bench.add_argument("--cache-size", type=int, default=None, help="side of the cached squares (default input*8/7)")
    bench.add_argument("--workers", type=int, default=0, help="DataLoader workers of cliptune's end-to-end path")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "transformers", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args, extra)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

