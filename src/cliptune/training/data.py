"""The training data of a run: which images and captions, how many steps (`TrainPlan`), and each epoch's
batches (`TrainingData.loader`), from annotation files (optionally through the image cache) or from
WebDataset shards streamed as they are read.

`TrainingData.read` reads the annotations (or counts the shards) without opening an image: enough for
the plan that `cliptune train --dry-run` prints. `TrainingData.load` is what a run trains on: every
image checked, captions tokenised once, the val split read (extracted from the shards when streaming).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from cliptune.config import DataConfig, RunConfig
from cliptune.data.batches import (
    PairCollator,
    PairDataset,
    StepBatchSampler,
    TokenizedCaptions,
    describe_skipped,
    epoch_pairs,
    plan_steps,
    scan_cached,
    scan_images,
    step_micro_batches,
    tokenize_captions,
)
from cliptune.data.device_augment import source_size, source_transform
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import DataError, ImageCaptions, SplitProblems, read_split
from cliptune.data.shards import ShardStats, materialize_webdataset
from cliptune.data.streaming import ShardCount, ShardPairStream, count_shards, expand_shards
from cliptune.training.stopping import TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from cliptune.data.cache import ImageCache

log = logging.getLogger(__name__)


@dataclass
class TrainPlan:
    """How many optimizer steps a run takes, and from what."""

    train_images: int
    pairs_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    effective_batch: int
    world_size: int

    def describe(self) -> str:
        return (f"plan: {self.total_steps} optimizer steps = {self.epochs} epoch(s) x {self.steps_per_epoch} steps; "
                f"effective batch {self.effective_batch} pairs ({self.pairs_per_epoch} pairs/epoch from "
                f"{self.train_images} images, {self.world_size} process(es))")


def plan_training(images: int, captions: int, config: RunConfig, world_size: int) -> TrainPlan:
    """Steps per epoch and in all, from the training split's image and caption counts."""
    cfg = config.train
    per_epoch = images if config.data.captions == "sample" else captions
    effective = cfg.effective_batch_size * world_size
    steps_per_epoch = plan_steps(per_epoch, effective, world_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return TrainPlan(images, per_epoch, steps_per_epoch, total, math.ceil(total / steps_per_epoch), effective,
                     world_size)


@dataclass
class TrainingData:
    """One process's view of a run's training data; build it with `read` (a plan) or `load` (batches)."""

    config: RunConfig
    world_size: int = 1
    rank: int = 0
    records: list[ImageCaptions] = field(default_factory=list)  # annotation files' training images; [] for shards
    shards: list[str] | None = None  # the streamed WebDataset shards, else None
    shard_count: ShardCount | None = None
    problems: SplitProblems = field(default_factory=SplitProblems)  # annotation rows dropped while reading
    preprocessing: Preprocessing | None = None  # None: read only, a plan without batches
    captions: TokenizedCaptions | None = None  # None when streaming: shards' captions are tokenised as they come
    image_source: ImageCache | None = None  # the image cache (data.cache_dir), else None: files are decoded
    val_records: list[ImageCaptions] = field(default_factory=list)
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (path or shard:key, why) left out
    pin_memory: bool = False

    @classmethod
    def read(cls, config: RunConfig, world_size: int = 1) -> TrainingData:
        """The training split's annotations, or the shards' sample counts, without opening an image."""
        if not config.data.streams_shards:
            records, problems = read_split(config.data, config.data.train_split)
            return cls(config, world_size, records=records, problems=problems)
        pattern = config.data.path.replace("{split}", config.data.train_split)
        shards = expand_shards(pattern)
        # Local (or mounted) files only: planning an epoch counts samples from the tar headers.
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise TrainingError(f"data.path: {len(missing)} of {len(shards)} shards are not local files "
                                f"(first: {missing[0]}; pattern {pattern}); URLs and pipe: sources are not streamed")
        count = count_shards(shards)
        if count.samples == 0:
            raise TrainingError(f"data.path: no sample with an image and a caption in {pattern}")
        if count.skipped:
            log.warning("%d shard samples lack an image or a caption and are skipped (first: %s)",
                        len(count.skipped), count.skipped[0][0])
        return cls(config, world_size, shards=shards, shard_count=count, bad_images=list(count.skipped))

    @classmethod
    def load(cls, config: RunConfig, preprocessing: Preprocessing, accelerator: Accelerator,
             pin_memory: bool = False) -> TrainingData:
        """`read`, then every training image checked (unreadable ones skipped or, with data.bad_images=fail,
        refused), captions tokenised, and the val split read when the run evaluates."""
        data = cls.read(config, accelerator.num_processes)
        speak = accelerator.is_main_process  # every rank checks; one speaks
        records, bad, captions, image_source = data.records, list(data.bad_images), None, None
        if data.shards is None:
            image_source = _open_cache(config, preprocessing)
            records, bad = _check_images(records, "train", config.data, image_source, speak)
            if bad and config.data.bad_images == "fail":
                listed = "\n  ".join(why for _, why in bad[:20])  # each reason already names its file
                raise TrainingError(f"{len(bad)} unreadable training image(s) (data.bad_images=fail):\n  {listed}")
            if not records:
                raise TrainingError("no readable training images left")
            captions = tokenize_captions(records, preprocessing)
        val_records: list[ImageCaptions] = []
        if config.train.report or config.train.eval_every:
            try:
                val = (_val_split_from_shards(config, accelerator, bad) if data.shards is not None
                       else read_split(config.data, config.data.val_split)[0])
                val_records, val_bad = _check_images(val, "val", config.data, image_source, speak)
                seen = {path for path, _ in bad}  # a file both splits use is listed once
                bad += [item for item in val_bad if item[0] not in seen]
            except ValueError as err:
                log.warning("no validation split (%s): validation and the report's metrics are skipped", err)
        return dataclasses.replace(data, rank=accelerator.process_index, records=records, preprocessing=preprocessing,
                                   captions=captions, image_source=image_source, val_records=val_records,
                                   bad_images=bad, pin_memory=pin_memory)

    @functools.cached_property
    def plan(self) -> TrainPlan:
        if self.shard_count is not None:
            images, captions = self.shard_count.samples, self.shard_count.captions
        else:
            images, captions = len(self.records), sum(len(r.captions) for r in self.records)
        return plan_training(images, captions, self.config, self.world_size)

    def notes(self) -> list[str]:
        """What the run report says about the training data."""
        notes = self.problems.summary()
        if self.captions is not None and self.captions.truncated:
            notes.append(f"{self.captions.truncated} training captions were longer than the model's "
                         f"{self.captions.max_length} tokens and were truncated.")
        return notes

    @property
    def augments_on_device(self) -> bool:
        """The loader ships un-augmented squares and the Trainer augments them on the device."""
        augment = self.config.data.augment
        return augment.on_device and augment.enabled

    @property
    def device_source_size(self) -> int:
        """Side of the squares the loader ships for device augmentation: the cache's, else input * 8/7."""
        return source_size(self.preprocessing.image_size, self.image_source.size if self.image_source else None)

    def loader(self, epoch: int, start_step: int) -> DataLoader:
        """This rank's micro-batches of `epoch` from optimizer step `start_step` on, in order: a pure
        function of (seed, epoch, step, rank), so a resumed run sees the batches an uninterrupted one would."""
        if self.preprocessing is None:
            raise RuntimeError("TrainingData.read only plans; TrainingData.load gives batches")
        cfg = self.config
        augment = cfg.data.augment
        if self.augments_on_device:
            # Un-augmented squares: the Trainer augments them on the device (DeviceAugment).
            transform = source_transform(self.preprocessing.resize_rule, self.device_source_size)
        else:
            # No augmentation asked for: a transform without one lets cached pixels skip PIL entirely.
            transform = self.preprocessing.image_transform(augment if augment.enabled else None)
        workers = cfg.data.num_workers
        common = dict(num_workers=workers, pin_memory=self.pin_memory, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)
        if self.shards is not None:
            stream = ShardPairStream(
                self.shards, self.preprocessing, transform, seed=cfg.train.seed, epoch=epoch, start_step=start_step,
                steps=self.plan.steps_per_epoch, micro_batch=cfg.train.micro_batch_size,
                accum=cfg.train.grad_accum_steps, rank=self.rank, world_size=self.world_size,
                captions=cfg.data.captions, buffer=cfg.data.shuffle_buffer, max_pixels=cfg.data.max_image_pixels)
            return DataLoader(stream, batch_size=None, **common)
        pairs = epoch_pairs(self.records, cfg.data.captions, cfg.train.seed, epoch)
        dataset = PairDataset(self.records, self.captions, transform, cfg.train.seed, cfg.data.max_image_pixels,
                              image_source=self.image_source)
        sampler = StepBatchSampler(pairs, epoch, self.plan.steps_per_epoch, start_step, cfg.train.micro_batch_size,
                                   cfg.train.grad_accum_steps, self.rank, self.world_size)
        # A private generator: creating the loader must not consume the global RNG (dropout's).
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=PairCollator(self.captions),
                          generator=torch.Generator(), **common)

    def steps(self, epoch: int, start_step: int) -> Iterator[list[dict]]:
        """Each optimizer step's micro-batches (this rank's), from `start_step` to the end of `epoch`."""
        cfg = self.config.train
        batches = iter(self.loader(epoch, start_step))  # workers start now, not inside the first step
        remaining = range(start_step, self.plan.steps_per_epoch)
        if self.shards is not None:  # the stream repeats its shards: every step is full
            counts = [cfg.grad_accum_steps for _ in remaining]
        else:  # an epoch's last step may hold fewer micro-batches
            pairs = epoch_pairs(self.records, self.config.data.captions, cfg.seed, epoch)
            counts = [len(step_micro_batches(pairs, step, cfg.micro_batch_size, cfg.grad_accum_steps, self.rank,
                                             self.world_size)) for step in remaining]
        return ([next(batches) for _ in range(count)] for count in counts)

    def keep_readable(self, micro_batches: list[dict]) -> list[dict]:
        """The micro-batches that still hold images. Each image a worker could not read is logged and
        added to `bad_images`, or, with data.bad_images=fail, stops the run."""
        for batch in micro_batches:
            for path, why in batch.get("errors", []):
                if self.config.data.bad_images == "fail":
                    raise TrainingError(f"unreadable image during training: {why}")
                log.warning("skipping unreadable image %s: %s", path, why)
                self.bad_images.append((path, why))
        return [batch for batch in micro_batches if "pixels" in batch]


def _check_images(records: list[ImageCaptions], split: str, cfg: DataConfig, image_source: ImageCache | None,
                  speak: bool) -> tuple[list[ImageCaptions], list[tuple[str, str]]]:
    if image_source is not None:
        good, bad = scan_cached(records, image_source)
    else:
        good, bad = scan_images(records, cfg.max_image_pixels, workers=max(2, cfg.num_workers),
                                desc=f"checking {split} images")
    if bad and speak:
        print(describe_skipped(bad, len(records), f"{split} images"))
    return good, bad


def _val_split_from_shards(config: RunConfig, accelerator: Accelerator,
                           bad_images: list[tuple[str, str]]) -> list[ImageCaptions]:
    """Evaluation needs random access: the val split's shards are extracted once (rank 0), into
    output_dir/val-from-shards, and read back as a JSONL dataset."""
    cfg = config.data
    if "{split}" not in cfg.path:
        raise DataError("data.path has no {split} placeholder, so the shards hold no separate val split")
    pattern = cfg.path.replace("{split}", cfg.val_split)
    # One {split} pattern names as many shards for val as for train; val usually has fewer.
    shards = [s for s in expand_shards(pattern) if Path(s).is_file()]
    if not shards:
        raise DataError(f"no val shard of {pattern} exists")
    folder = Path(config.train.output_dir) / "val-from-shards"
    if accelerator.is_main_process and not (folder / "captions.jsonl").is_file():
        log.info("extracting the val split from %d shard(s) of %s", len(shards), pattern)
        partial = folder.with_name("val-from-shards.partial")
        shutil.rmtree(partial, ignore_errors=True)
        stats = ShardStats()
        materialize_webdataset("::".join(shards), partial, split=cfg.val_split, stats=stats)
        bad_images += stats.skipped
        partial.rename(folder)  # complete or absent: an interrupted extraction starts over
    accelerator.wait_for_everyone()
    jsonl = DataConfig(path=str(folder / "captions.jsonl"), format="jsonl", max_images=cfg.max_images)
    return read_split(jsonl, cfg.val_split)[0]


def _open_cache(config: RunConfig, preprocessing: Preprocessing) -> ImageCache | None:
    if not config.data.cache_dir:
        return None
    from cliptune.data.cache import ImageCache

    # Warns in the run log when the cached pixels are not exactly the model processor's.
    return ImageCache.open(Path(config.data.cache_dir), expect=preprocessing.image_transform())
