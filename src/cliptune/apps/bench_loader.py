"""`cliptune bench --loader-only`: how many pairs/s the training input pipeline feeds, per DataLoader
worker, with no model.

The same `PairDataset` + `PairCollator` + `DataLoader` the Trainer uses, over the train split, for:

- `jpeg_cpu_augment`: JPEG decode + PIL augmentation in the worker (`data.augment`, no cache);
- `jpeg_exact`: JPEG decode + the model's exact resize, no augmentation;
- `cache_input_size`: rows of an image cache at the model input size (a copy: no PIL at all);
- `cache_cpu_augment`: a cache at input * 8/7 + PIL augmentation in the worker;
- `cache_device_augment`: the same cache's rows shipped as they are (`data.augment.on_device`); the
  augmentation then runs in the training process on the device, timed on its own
  (`device_augment_pairs_per_s`: pinned uint8 copy + `DeviceAugment` + normalisation) and after the
  loader (`cache_device_augment_end_to_end_pairs_per_s`).

Each rate is pairs over the wall time after the first batch (worker start-up excluded), for at least
`seconds`. `workers_for_10k_pairs_per_s` is ceil(10000 / the one-worker rate): it assumes the rate
grows linearly with workers, each with a free core. Captions are tokenised once before training
(`tokenize_captions`), not in the loader: `tokenize_captions_per_s` is that one-off cost.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cliptune.apps.bench_trainer import cpu_facts
from cliptune.apps.timing import sync_device
from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS, AugmentConfig, DataConfig, ModelConfig, UsageError
from cliptune.data.batches import PairCollator, PairDataset, TokenizedCaptions, epoch_pairs, tokenize_captions
from cliptune.data.cache import ImageCache, build_cache
from cliptune.data.device_augment import DeviceAugment, augment_seed, source_size, source_transform
from cliptune.data.images import ImageTransform
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import ImageCaptions, read_split
from cliptune.models.contrastive import RANDOM_VIT_B_32, load_preprocessing
from cliptune.runtime import resolve_device

log = logging.getLogger(__name__)

TARGET_PAIRS_PER_S = 10_000  # issue #14's GPU target: ViT-B/32 LoRA on one H100
# What the bench augments with: every operation on, so each path pays for all of them.
BENCH_AUGMENT = AugmentConfig(random_resized_crop=True, crop_scale=(0.5, 1.0), color_jitter=0.4, horizontal_flip=True)


@dataclass
class LoaderBenchOptions:
    model: str = RANDOM_VIT_B_32
    """Whose preprocessing (input size, resize rule, tokenizer); its weights are never loaded."""
    data: Path | None = None
    """Annotations (any format `data.path` takes) or a folder with COCO's `captions_train.json`."""
    device: str = "auto"
    """Where device augmentation runs (`--train.device`)."""
    batch: int = 64
    """Pairs a batch."""
    workers: tuple[int, ...] = (0, 1)
    """DataLoader worker counts timed; 0 = in the main process. The per-worker rate is the 1-worker one."""
    seconds: float = 3.0
    """Minimum timed seconds per measurement (after the first batch)."""
    short: bool = False
    """A smoke run: at most 16 images (and a batch of at most that), 0.3 s per measurement."""
    cache_dir: Path | None = None
    """An image cache for the paths that augment from the cache (its rows are the squares they crop);
    default a temporary one at `cache_size`."""
    cache_size: int | None = None
    """Side of the temporary cache's squares; default input * 8/7 (256 for 224)."""
    augment: AugmentConfig = field(default_factory=lambda: BENCH_AUGMENT)


class _EndlessBatches:
    """The Trainer's batches (one seeded caption per image, shuffled per epoch), epoch after epoch, without end."""

    def __init__(self, records: list[ImageCaptions], batch: int):
        self.records, self.batch = records, batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for epoch in itertools.count():
            keys = [(epoch, image, caption) for image, caption in epoch_pairs(self.records, "sample", 0, epoch)]
            for start in range(0, len(keys) - self.batch + 1, self.batch):  # full batches only: equal work each
                yield keys[start: start + self.batch]


def _source(data: Path | None) -> Path:
    if data is None:
        raise UsageError("bench --loader-only: no data: give --data.path, annotations or a folder with "
                         "captions_train.json and its images")
    return data / "captions_{split}.json" if data.is_dir() else data


def timed_rate(batches: Iterator[dict], seconds: float, consume: Callable[[dict], None] | None = None,
               device: torch.device | None = None) -> float:
    """Pairs/s of `batches` after the first one (start-up excluded), over at least `seconds` and 3 batches.
    `consume` is what the training process does with each batch (e.g. copy and augment it)."""
    first = next(batches)
    if consume is not None:
        consume(first)
    if device is not None:
        sync_device(device)
    started, pairs, count = time.perf_counter(), 0, 0
    while count < 3 or time.perf_counter() - started < seconds:
        batch = next(batches)
        if consume is not None:
            consume(batch)
        pairs += len(batch["image_ids"])
        count += 1
    if device is not None:
        sync_device(device)
    return pairs / (time.perf_counter() - started)


class _LoaderBench:
    def __init__(self, options: LoaderBenchOptions, preprocessing: Preprocessing, records: list[ImageCaptions],
                 device: torch.device):
        self.options, self.preprocessing, self.records, self.device = options, preprocessing, records, device
        self.seconds = 0.3 if options.short else options.seconds
        started = time.perf_counter()
        self.tokens: TokenizedCaptions = tokenize_captions(records, preprocessing)
        captions = sum(len(r.captions) for r in records)
        self.tokenize_captions_per_s = captions / (time.perf_counter() - started)

    def _loader(self, transform: ImageTransform, image_source: ImageCache | None, workers: int) -> Iterator[dict]:
        dataset = PairDataset(self.records, self.tokens, transform, 0, DEFAULT_MAX_IMAGE_PIXELS, image_source)
        loader = DataLoader(dataset, batch_sampler=_EndlessBatches(self.records, self.options.batch),
                            collate_fn=PairCollator(self.tokens), num_workers=workers,
                            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
                            generator=torch.Generator())
        return iter(loader)

    def loader_rate(self, transform: ImageTransform, image_source: ImageCache | None, workers: int,
                    consume: Callable[[dict], None] | None = None) -> float:
        batches = self._loader(transform, image_source, workers)
        try:
            return timed_rate(batches, self.seconds, consume, self.device if consume is not None else None)
        finally:
            del batches  # shuts the workers down before the next measurement starts its own

    def device_augmenter(self, batch_index: Iterator[int]) -> Callable[[dict], torch.Tensor]:
        """What the Trainer does with a loader batch under `data.augment.on_device`: the pinned uint8
        copy, `DeviceAugment` with a seeded generator, normalisation."""
        augment = DeviceAugment(self.options.augment, self.preprocessing.image_size, self.preprocessing.resize_rule)

        def run(batch: dict) -> torch.Tensor:
            pixels = batch["pixels"].to(self.device, non_blocking=True)
            generator = torch.Generator().manual_seed(augment_seed(0, "bench", next(batch_index)))
            return self.preprocessing.normalize(augment(pixels, generator))

        return run

    def device_augment_rate(self, squares: ImageCache) -> float:
        """`device_augmenter` alone, on one loader batch of squares (pinned on CUDA) used again and again."""
        batch = next(self._loader(source_transform(self.preprocessing.resize_rule, squares.size), squares, 0))
        if self.device.type == "cuda":
            batch["pixels"] = batch["pixels"].pin_memory()
        run = self.device_augmenter(itertools.count())
        return timed_rate(itertools.repeat(batch), self.seconds, run, self.device)


def run_loader_bench(options: LoaderBenchOptions) -> dict:
    """Every measurement, as one JSON-ready dict (the keys: docs/speed.md, "Input pipeline").

    The main process runs torch on one thread meanwhile, as a DataLoader worker does: its in-process
    rates (`workers_0`, device augmentation on a CPU) are then one core's, and a second thread
    spinning on a busy machine made them up to 10x slower, not faster."""
    facts, threads = cpu_facts(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {**_run(options), **facts, "bench_torch_threads": 1}
    finally:
        torch.set_num_threads(threads)


def _run(options: LoaderBenchOptions) -> dict:
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device = resolve_device(options.device)
    records, _ = read_split(DataConfig(path=str(_source(options.data))), "train")
    records = records[:16] if options.short else records
    if options.short:  # a smoke run on whatever data it is given
        options = dataclasses.replace(options, batch=min(options.batch, len(records)))
    if len(records) < options.batch:  # batches are full ones only (equal work each): none would come
        raise UsageError(f"bench --loader-only: --train.micro_batch_size {options.batch} is more than the "
                         f"{len(records)} training images")
    preprocessing = load_preprocessing(ModelConfig(name=options.model))
    size = preprocessing.image_size
    bench = _LoaderBench(options, preprocessing, records, device)
    augment, rule = options.augment, preprocessing.resize_rule
    with tempfile.TemporaryDirectory(prefix="cliptune-loader-bench-") as temporary:
        exact = build_cache(records, Path(temporary) / "input", size, workers=os.cpu_count(), progress=False,
                            rule=rule)
        exact_cache = ImageCache.open(exact.cache_dir)
        if options.cache_dir is not None:
            squares = ImageCache.open(options.cache_dir)
        else:
            side = options.cache_size or source_size(size)
            squares_stats = build_cache(records, Path(temporary) / "squares", side, workers=os.cpu_count(),
                                        progress=False, rule=source_transform(rule, side).rule)
            squares = ImageCache.open(squares_stats.cache_dir)
        paths: dict[str, tuple[ImageTransform, ImageCache | None]] = {
            "jpeg_cpu_augment": (preprocessing.image_transform(augment), None),
            "jpeg_exact": (preprocessing.image_transform(), None),
            "cache_input_size": (preprocessing.image_transform(), exact_cache),
            "cache_cpu_augment": (preprocessing.image_transform(augment), squares),
            "cache_device_augment": (source_transform(rule, squares.size), squares),
        }
        loader: dict[str, dict[str, float]] = {}
        for name, (transform, image_source) in paths.items():
            loader[name] = {}
            for workers in options.workers:
                log.info("bench --loader-only: %s, %d worker(s)", name, workers)
                loader[name][f"workers_{workers}"] = round(bench.loader_rate(transform, image_source, workers), 1)
        device_rate = bench.device_augment_rate(squares)
        end_to_end = {f"workers_{w}": round(bench.loader_rate(paths["cache_device_augment"][0], squares, w,
                                                               bench.device_augmenter(itertools.count())), 1)
                      for w in options.workers}
    per_worker = {name: rates["workers_1"] for name, rates in loader.items() if "workers_1" in rates}
    return {
        "loader_pairs_per_s": loader,
        "pairs_per_s_per_worker": per_worker,
        "workers_for_10k_pairs_per_s": {name: workers_for(rate) for name, rate in per_worker.items()},
        "device_augment_pairs_per_s": round(device_rate, 1),
        "cache_device_augment_end_to_end_pairs_per_s": end_to_end,
        "tokenize_captions_per_s": round(bench.tokenize_captions_per_s, 1),
        "note": "workers_for_10k_pairs_per_s = ceil(10000 / pairs_per_s_per_worker): it assumes the rate grows "
                "linearly with workers, each on a free core. Device augmentation runs in the training process "
                "(device_augment_pairs_per_s), not in the workers; on a CPU device it shares the cores with them. "
                "Captions are tokenised once before training (tokenize_captions_per_s), not in the loader.",
        "model": options.model, "image_size": size, "source_size": squares.size, "micro_batch": options.batch,
        "images": len(records), "augment": asdict(augment), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "seconds_per_measurement": bench.seconds, "short": options.short,
        "cpu_count": os.cpu_count(), "load_average_1min_at_start": load, "torch": torch.__version__,
        "bench_seconds": round(time.perf_counter() - started, 1),
    }


def workers_for(pairs_per_s_per_worker: float, target: float = TARGET_PAIRS_PER_S) -> int:
    """Workers that `target` pairs/s needs at this rate each, if the rate scaled linearly."""
    return math.ceil(target / pairs_per_s_per_worker)


__all__ = ["LoaderBenchOptions", "run_loader_bench", "workers_for"]
