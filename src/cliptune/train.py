"""The training recipe: `Trainer(config).setup()`, then `.train()`.

One optimizer step sees `micro_batch_size * grad_accum_steps * world_size` pairs. With
`accumulation: exact` the loss is computed over all of them at once (GradCache): micro-batches are
first encoded without gradients, the loss's gradient with respect to those cached features is
computed, and each micro-batch is then re-encoded with gradients and back-propagated with its
share, replaying the same dropout. Gradients equal one big batch's at a micro-batch's memory.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import get_int_from_env
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cliptune.checkpoint import load_latest_checkpoint, save_checkpoint
from cliptune.config import ConfigError, DataConfig, RunConfig, save_config
from cliptune.data import DataError, ImageCaptions, SplitProblems, read_split
from cliptune.evaluate import autocast_context, embed_split, embed_split_sharded, score_embeddings
from cliptune.lora import ParameterCount, apply_lora, save_adapter
from cliptune.loss import clip_loss, gather_ids, gather_sizes, gather_with_grad, siglip_loss
from cliptune.model import ContrastiveModel, Preprocessing, load_model
from cliptune.pipeline import (
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
from cliptune.runtime import resolve_device, resolve_precision
from cliptune.schedule import lr_multiplier
from cliptune.streaming import ShardPairStream, count_shards, expand_shards
from cliptune.webdataset_source import ShardStats, materialize_webdataset

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


@dataclass
class TrainPlan:
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


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    train_seconds: float
    pairs_per_second: float
    parameters: ParameterCount
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    interrupted: bool = False
    skipped_steps: int = 0
    bad_images: list[tuple[str, str]] = field(default_factory=list)


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


def contrastive_loss(config: RunConfig, family: str):
    kind = config.train.loss if config.train.loss != "auto" else ("siglip" if family == "siglip" else "clip")

    def loss_fn(image: torch.Tensor, text: torch.Tensor, model: ContrastiveModel, image_ids: torch.Tensor):
        scale = model.logit_scale.exp()
        if kind == "siglip":
            bias = model.logit_bias
            if bias is None:
                bias = torch.zeros((), device=image.device)
            return siglip_loss(image, text, scale, bias, image_ids)
        return clip_loss(image, text, scale, image_ids)

    loss_fn.kind = kind
    return loss_fn


class _RngReplay:
    """Snapshot of the torch RNG, so a re-encode replays the same dropout masks."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False, progress: bool = True):
        self.config = config
        self.resume = resume
        self.progress = progress
        self.output_dir = Path(config.train.output_dir)
        self._stop_signal: int | None = None

    # -- setup ------------------------------------------------------------------------------

    def setup_model(self) -> ParameterCount:
        cfg = self.config
        self.device = resolve_device(cfg.train.device)
        # Accelerate's device matters only to a launched multi-process run (which one each rank takes, gloo
        # for CPUs); a single process uses self.device. Asking for cpu=True there would also fail once an
        # earlier Accelerator in this process chose a GPU ("AcceleratorState has already been initialized").
        launched = get_int_from_env(["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE"], 1) > 1
        self.accelerator = Accelerator(cpu=self.device.type == "cpu" and launched)
        if self.accelerator.num_processes > 1:
            # Each process takes its local rank's device; one fixed index cannot serve them all.
            if self.device.index is not None:
                raise ConfigError(f"train.device: {cfg.train.device} names one device, but {self.accelerator.num_processes}"
                                  f" processes share this run; use {self.device.type}")
            self.device = self.accelerator.device
        elif self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # kernels and allocations without an explicit device go there too
        self.precision = resolve_precision(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)  # new layers (LoRA A, composed heads) start the same every run
        self.model, self.preprocessing = load_model(cfg.model)
        self.parameters = apply_lora(self.model, cfg.lora)
        if cfg.train.gradient_checkpointing:
            base = self.model.base
            if not getattr(base, "supports_gradient_checkpointing", False):
                raise TrainingError("train.gradient_checkpointing: this model does not support it")
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.loss_fn = contrastive_loss(cfg, self.model.family)
        return self.parameters

    def setup_data(self) -> TrainPlan:
        cfg = self.config
        self.shards: list[str] | None = None
        self.bad_images = []
        self.annotation_problems = SplitProblems()
        if cfg.data.streams_shards:
            self._setup_shards()
        else:
            records, problems = read_split(cfg.data, cfg.data.train_split)
            self.annotation_problems: SplitProblems = problems
            self.image_source = _open_cache(cfg, self.preprocessing)
            good, bad = self._check_images(records, "train")
            self.bad_images = bad
            if bad and cfg.data.bad_images == "fail":
                listed = "\n  ".join(why for _, why in bad[:20])  # each reason already names its file
                raise TrainingError(f"{len(bad)} unreadable training image(s) (data.bad_images=fail):\n  {listed}")
            if not good:
                raise TrainingError("no readable training images left")
            self.train_records: list[ImageCaptions] = good
            self.train_captions: TokenizedCaptions = tokenize_captions(good, self.preprocessing)
        self.val_records: list[ImageCaptions] = []
        if cfg.train.report or cfg.train.eval_every:
            try:
                val = self._val_split_from_shards() if self.shards is not None else \
                    read_split(cfg.data, cfg.data.val_split)[0]
                val_good, val_bad = self._check_images(val, "val")
                self.bad_images += val_bad
                self.val_records = val_good
            except ValueError as err:
                log.warning("no validation split (%s): validation and the report's metrics are skipped", err)
        self.plan = self._plan()
        return self.plan

    def _setup_shards(self) -> None:
        """Training streams the shards: only their sample and caption counts are read up front."""
        cfg = self.config.data
        pattern = cfg.path.replace("{split}", cfg.train_split)
        self.shards = expand_shards(pattern)
        # Local (or mounted) files only: planning an epoch counts samples from the tar headers.
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise TrainingError(f"data.path: {len(missing)} of {len(self.shards)} shards are not local files "
                                f"(first: {missing[0]}; pattern {pattern}); URLs and pipe: sources are not streamed")
        self.image_source = None
        self.shard_count = count_shards(self.shards)
        if self.shard_count.samples == 0:
            raise TrainingError(f"data.path: no sample with an image and a caption in {pattern}")
        if self.shard_count.skipped:
            log.warning("%d shard samples lack an image or a caption and are skipped (first: %s)",
                        len(self.shard_count.skipped), self.shard_count.skipped[0][0])
            self.bad_images += self.shard_count.skipped
        self.train_records = []
        self.train_captions = None  # captions are tokenised as they stream

    def _val_split_from_shards(self) -> list[ImageCaptions]:
        """Evaluation needs random access: the val split's shards are extracted once (rank 0), into
        output_dir/val-from-shards, and read back as a JSONL dataset."""
        cfg = self.config.data
        if "{split}" not in cfg.path:
            raise DataError("data.path has no {split} placeholder, so the shards hold no separate val split")
        pattern = cfg.path.replace("{split}", cfg.val_split)
        # One {split} pattern names as many shards for val as for train; val usually has fewer.
        shards = [s for s in expand_shards(pattern) if Path(s).is_file()]
        if not shards:
            raise DataError(f"no val shard of {pattern} exists")
        folder = self.output_dir / "val-from-shards"
        if self.accelerator.is_main_process and not (folder / "captions.jsonl").is_file():
            log.info("extracting the val split from %d shard(s) of %s", len(shards), pattern)
            partial = folder.with_name("val-from-shards.partial")
            shutil.rmtree(partial, ignore_errors=True)
            stats = ShardStats()
            materialize_webdataset("::".join(shards), partial, split=cfg.val_split, stats=stats)
            for name, why in stats.skipped:
                self.bad_images.append((name, why))
            partial.rename(folder)  # complete or absent: an interrupted extraction starts over
        self.accelerator.wait_for_everyone()
        jsonl = DataConfig(path=str(folder / "captions.jsonl"), format="jsonl", max_images=cfg.max_images)
        return read_split(jsonl, cfg.val_split)[0]

    def _check_images(self, records: list[ImageCaptions], split: str):
        if self.image_source is not None:
            good, bad = scan_cached(records, self.image_source)
        else:
            good, bad = scan_images(records, self.config.data.max_image_pixels,
                                    workers=max(2, self.config.data.num_workers), desc=f"checking {split} images")
        if bad and self.accelerator.is_main_process:  # every rank checks; one speaks
            print(describe_skipped(bad, len(records), f"{split} images"))
        return good, bad

    def _plan(self) -> TrainPlan:
        if self.shards is not None:
            images, captions = self.shard_count.samples, self.shard_count.captions
        else:
            images, captions = len(self.train_records), sum(len(r.captions) for r in self.train_records)
        return plan_training(images, captions, self.config, self.accelerator.num_processes)

    def setup(self) -> None:
        """Model, data, optimizer, schedule, and (with resume) the checkpoint's state. The first two
        are skipped when already done (the CLI prints the parameter count and plan in between)."""
        if not hasattr(self, "model"):
            self.setup_model()
        if not hasattr(self, "plan"):
            self.setup_data()
        cfg = self.config.train
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        warmup = int(cfg.warmup_ratio * self.plan.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, self.plan.total_steps, warmup, cfg.schedule))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.model.to(self.device)
        self.ddp_model = self._wrap_ddp()
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_row = 0
        self.pairs_seen = 0
        self.train_seconds = 0.0
        if self.resume:
            self._restore()

    def _wrap_ddp(self):
        if self.accelerator.num_processes == 1:
            return self.model
        # The temperature is used by the loss outside forward(); DDP must not wait for its gradient,
        # which is averaged by hand after the backward passes.
        scale_names = [n for n, p in self.model.named_parameters()
                       if p is self.model.logit_scale or p is self.model.logit_bias]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, scale_names)
        return self.accelerator.prepare_model(self.model)

    # -- checkpoints --------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        counters = {"step": self.step, "skipped_steps": self.skipped_steps, "nonfinite_in_row": self.nonfinite_in_row,
                    "pairs_seen": self.pairs_seen, "train_seconds": self.train_seconds,
                    "total_steps": self.plan.total_steps, "world_size": self.accelerator.num_processes}
        return save_checkpoint(self.checkpoint_root, self.step, self._trainable_state(), state, counters,
                               self.config.train.keep_checkpoints)

    def _restore(self) -> None:
        checkpoint = load_latest_checkpoint(self.checkpoint_root)
        if checkpoint is None:
            log.warning("--resume: no usable checkpoint in %s; starting from step 0", self.checkpoint_root)
            return
        params = self._trainable_state()
        unknown = set(checkpoint.weights) ^ set(params)
        if unknown:
            raise TrainingError(f"{checkpoint.path} does not match this config's trainable weights "
                                f"(e.g. {sorted(unknown)[:3]}); was the config changed?")
        with torch.no_grad():
            for name, value in checkpoint.weights.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(checkpoint.trainer_state["optimizer"])
        self.scheduler.load_state_dict(checkpoint.trainer_state["scheduler"])
        if self.scaler is not None and checkpoint.trainer_state.get("scaler"):
            self.scaler.load_state_dict(checkpoint.trainer_state["scaler"])
        rng = checkpoint.trainer_state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        counters = checkpoint.counters
        self.step = counters["step"]
        self.skipped_steps = counters["skipped_steps"]
        self.nonfinite_in_row = counters["nonfinite_in_row"]
        self.pairs_seen = counters["pairs_seen"]
        self.train_seconds = counters["train_seconds"]
        self._truncate_metrics(self.step)
        log.info("resumed from %s (step %d of %d)", checkpoint.path, self.step, self.plan.total_steps)

    # -- metrics ------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _truncate_metrics(self, step: int) -> None:
        """Drop records written after the checkpoint we resume from: they will be written again."""
        if not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log_metrics(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    # -- one optimizer step ----------------------------------------------------------------------

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        pixels = self.preprocessing.normalize(pixels)
        return (pixels, batch["input_ids"].to(self.device, non_blocking=True),
                batch["attention_mask"].to(self.device, non_blocking=True), batch["image_ids"].to(self.device))

    def _encode(self, pixels, input_ids, attention_mask):
        with autocast_context(self.device, self.precision):
            return self.ddp_model(pixels, input_ids, attention_mask)

    def _backward(self, tensors, grads=None) -> None:
        if self.scaler is not None and grads is None:
            tensors = [self.scaler.scale(t) for t in tensors]
        torch.autograd.backward(tensors, grads)

    def _no_sync(self, last: bool):
        import contextlib

        if last or self.ddp_model is self.model:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """Forward + backward over one optimizer step's micro-batches; returns the loss (detached)."""
        inputs = [self._inputs(b) for b in micro_batches]
        # A single micro-batch is already the whole batch: exact and plain are the same computation,
        # and the plain one encodes once instead of twice.
        if self.config.train.accumulation == "plain" or len(inputs) == 1:
            losses = []
            for i, (pixels, ids, mask, image_ids) in enumerate(inputs):
                with self._no_sync(i == len(inputs) - 1):
                    image, text = self._encode(pixels, ids, mask)
                    loss = self._global_loss(image, text, image_ids) / len(inputs)
                    self._backward([loss])
                losses.append(loss.detach())
            return torch.stack(losses).sum()
        # Exact accumulation (GradCache). 1: encode every micro-batch without gradients.
        snapshots, image_cache, text_cache = [], [], []
        with torch.no_grad():
            for pixels, ids, mask, _ in inputs:
                snapshots.append(_RngReplay(self.device))
                image, text = self._encode(pixels, ids, mask)
                image_cache.append(image.float())
                text_cache.append(text.float())
        after = _RngReplay(self.device)
        # 2: the loss over the whole (global) batch, and its gradient w.r.t. the cached features.
        image_all = torch.cat(image_cache).requires_grad_(True)
        text_all = torch.cat(text_cache).requires_grad_(True)
        image_ids = torch.cat([x[3] for x in inputs])
        loss = self._global_loss(image_all, text_all, image_ids)
        self._backward([loss])
        image_grads = image_all.grad.split([len(x) for x in image_cache])
        text_grads = text_all.grad.split([len(x) for x in text_cache])
        # 3: re-encode each micro-batch with gradients, replaying its dropout, and back-propagate its share.
        for i, (pixels, ids, mask, _) in enumerate(inputs):
            snapshots[i].restore()
            with self._no_sync(i == len(inputs) - 1):
                image, text = self._encode(pixels, ids, mask)
                self._backward([image.float(), text.float()], [image_grads[i], text_grads[i]])
        after.restore()
        return loss.detach()

    def _global_loss(self, image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """The loss over every rank's pairs: features gathered with their gradients, one row count exchange."""
        if self.accelerator.num_processes == 1:
            return self.loss_fn(image, text, self.model, image_ids)
        sizes = gather_sizes(len(image), image.device)
        return self.loss_fn(gather_with_grad(image, sizes), gather_with_grad(text, sizes), self.model,
                            gather_ids(image_ids, sizes))

    def _sync_scale_grads(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        for param in (self.model.logit_scale, self.model.logit_bias):
            if param is not None and param.requires_grad and param.grad is not None:
                param.grad.copy_(self.accelerator.reduce(param.grad, reduction="mean"))

    def optimizer_step(self) -> float | None:
        """Clip, step, schedule. Returns the gradient norm (None when clipping is off)."""
        cfg = self.config.train
        self._sync_scale_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if cfg.max_grad_norm is not None:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, float], object] | tuple[None, None]:
        """Val loss and retrieval metrics from one embedding pass over the val split.

        Under several processes every rank must call it: each encodes its share of the split and the
        embeddings are all-gathered, so every rank returns the same metrics for the whole split.
        """
        if not self.val_records:
            return None, None
        cfg = self.config
        world = self.accelerator.num_processes
        if world > 1 and len(self.val_records) >= world:
            embeddings = embed_split_sharded(self.model, self.val_records, self.preprocessing, self.device,
                                             self.accelerator.process_index, world,
                                             cfg.train.eval_batch_size, cfg.data.max_image_pixels, self.precision,
                                             image_source=self.image_source)
        else:  # one process, or fewer images than processes: every rank encodes the whole (small) split
            embeddings = embed_split(self.model, self.val_records, self.preprocessing, self.device,
                                     cfg.train.eval_batch_size, 0, cfg.data.max_image_pixels, self.precision,
                                     image_source=self.image_source, progress=False)
        metrics = score_embeddings(embeddings)
        metrics["val_loss"] = self.val_loss(embeddings)
        self.model.train()
        return metrics, embeddings

    @torch.no_grad()
    def val_loss(self, embeddings) -> float:
        """Loss over consecutive batches of the effective size, each image with its first caption.

        A contrastive loss depends on the batch size, so it is only comparable within one config.
        """
        first = torch.zeros(len(embeddings.image_emb), dtype=torch.long)
        seen = torch.zeros(len(embeddings.image_emb), dtype=torch.bool)
        for text_index, image_index in enumerate(embeddings.text_image_index.tolist()):
            if not seen[image_index]:
                first[image_index], seen[image_index] = text_index, True
        text = embeddings.text_emb[first]
        size = self.config.train.effective_batch_size
        losses = []
        for start in range(0, len(text), size):
            image_chunk = embeddings.image_emb[start: start + size].to(self.device)
            text_chunk = text[start: start + size].to(self.device)
            ids = torch.arange(len(image_chunk), device=self.device)
            losses.append(float(self.loss_fn(image_chunk, text_chunk, self.model, ids)))
        return sum(losses) / len(losses)

    # -- the loop ---------------------------------------------------------------------------------

    def _loader(self, epoch: int, start_step: int):
        cfg = self.config
        augment = cfg.data.augment
        augmenting = augment.random_resized_crop or augment.color_jitter > 0 or augment.horizontal_flip
        # No augmentation asked for: a transform without one lets cached pixels skip PIL entirely.
        transform = self.preprocessing.image_transform(augment if augmenting else None)
        workers = cfg.data.num_workers
        if self.shards is not None:
            dataset = ShardPairStream(
                self.shards, self.preprocessing, transform, seed=cfg.train.seed, epoch=epoch, start_step=start_step,
                steps=self.plan.steps_per_epoch, micro_batch=cfg.train.micro_batch_size,
                accum=cfg.train.grad_accum_steps, rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes, captions=cfg.data.captions,
                buffer=cfg.data.shuffle_buffer, max_pixels=cfg.data.max_image_pixels)
            return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
                              persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
        pairs = epoch_pairs(self.train_records, cfg.data.captions, cfg.train.seed, epoch)
        self._epoch_pairs = pairs
        dataset = PairDataset(self.train_records, self.train_captions, transform, cfg.train.seed,
                              cfg.data.max_image_pixels, image_source=self.image_source)
        sampler = StepBatchSampler(pairs, epoch, self.plan.steps_per_epoch, start_step, cfg.train.micro_batch_size,
                                   cfg.train.grad_accum_steps, self.accelerator.process_index,
                                   self.accelerator.num_processes)
        # A private generator: creating the loader must not consume the global RNG (dropout's).
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=PairCollator(self.train_captions),
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator(), persistent_workers=False,
                          prefetch_factor=4 if workers > 0 else None)

    def _micro_batches_in_step(self, step_in_epoch: int) -> int:
        cfg = self.config.train
        if self.shards is not None:
            return cfg.grad_accum_steps  # the stream repeats its shards: every step is full
        return len(step_micro_batches(self._epoch_pairs, step_in_epoch, cfg.micro_batch_size, cfg.grad_accum_steps,
                                      self.accelerator.process_index, self.accelerator.num_processes))

    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, handler)
        return previous

    def train(self) -> TrainResult:
        cfg = self.config
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard")) if self.accelerator.is_main_process else None
        results: dict[str, dict[str, float]] = {}
        zero_shot_path = self.output_dir / "zeroshot_metrics.json"
        if cfg.train.report and self.val_records:
            # Rank 0 decides (the file may live on its disk only); every rank then joins the evaluation.
            from accelerate.utils import broadcast_object_list

            done = [zero_shot_path.is_file() if self.accelerator.is_main_process else None]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(done)
            if done[0]:
                if self.accelerator.is_main_process:
                    results["zero-shot"] = json.loads(zero_shot_path.read_text(encoding="utf-8"))
            else:
                metrics, _ = self.evaluate()
                results["zero-shot"] = metrics
                if self.accelerator.is_main_process:
                    zero_shot_path.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        self.model.train()
        previous_handlers = self._install_signal_handlers()
        interrupted = False
        bar = tqdm(total=self.plan.total_steps, initial=self.step, desc="training", dynamic_ncols=True,
                   disable=not (self.progress and self.accelerator.is_main_process))
        try:
            interrupted = self._loop(bar)
        finally:
            bar.close()
            for s, h in previous_handlers.items():
                signal.signal(s, h)
        if interrupted:
            path = self.save()
            if self.tensorboard is not None:
                self.tensorboard.close()
            log.warning("interrupted by signal %s at step %d; checkpoint %s. Resume with: "
                        "cliptune train --config %s --resume", self._stop_signal, self.step, path,
                        self.output_dir / "config.yaml")
            return self._result(results, interrupted=True)
        if self.accelerator.is_main_process:
            if cfg.train.save_every == 0 or self.step % cfg.train.save_every != 0:
                self.save()
            save_adapter(self.model, self.output_dir / "adapter")
        final_embeddings = None
        if cfg.train.report and self.val_records:
            metrics, final_embeddings = self.evaluate()
            results["fine-tuned"] = metrics
            if self.accelerator.is_main_process:
                (self.output_dir / "metrics.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        if self.tensorboard is not None:
            self.tensorboard.close()
        result = self._result(results, interrupted=False)
        if cfg.train.report and self.accelerator.is_main_process:
            from cliptune.reporting import write_run_report

            write_run_report(self, result, final_embeddings)
        return result

    def _result(self, results, interrupted: bool) -> TrainResult:
        pairs_per_second = self.pairs_seen / self.train_seconds if self.train_seconds > 0 else 0.0
        return TrainResult(self.output_dir, self.output_dir / "adapter", self.step, self.train_seconds,
                           pairs_per_second, self.parameters, results, interrupted, self.skipped_steps,
                           list(self.bad_images))

    def _loop(self, bar) -> bool:
        """Run steps until done; True if a signal asked us to stop (after finishing the current step)."""
        cfg = self.config.train
        world = self.accelerator.num_processes
        while self.step < self.plan.total_steps:
            epoch, start = divmod(self.step, self.plan.steps_per_epoch)
            batches = iter(self._loader(epoch, start))
            for step_in_epoch in range(start, self.plan.steps_per_epoch):
                if self.step >= self.plan.total_steps:
                    break
                count = self._micro_batches_in_step(step_in_epoch)
                # Read before the step: stepping the scheduler already moves it to the next step's lr.
                lr = self.scheduler.get_last_lr()[0]
                started = time.perf_counter()  # end to end: waiting for the loader counts
                micro = [next(batches) for _ in range(count)]
                for b in micro:
                    for path, why in b.get("errors", []):
                        if self.config.data.bad_images == "fail":
                            raise TrainingError(f"unreadable image during training: {why}")
                        log.warning("skipping unreadable image %s: %s", path, why)
                        self.bad_images.append((path, why))
                micro = [b for b in micro if "pixels" in b]
                if world > 1 and not self._on_every_rank(len(micro) == count):
                    # The step's collectives run once per micro-batch on every rank: a rank that lost a
                    # whole micro-batch to unreadable images would leave the others waiting. All skip it.
                    micro = []
                if not micro:
                    log.warning("step %d skipped: a micro-batch had no readable image", self.step)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.skipped_steps += 1
                    self.scheduler.step()
                    loss_value = float("nan")
                else:
                    loss_value = float(self.accelerator.reduce(self.train_step(micro).to(self.device), reduction="mean"))
                    self._step_or_skip_nonfinite(loss_value)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - started
                pairs = sum(len(b["image_ids"]) for b in micro) * world
                self.train_seconds += elapsed
                self.pairs_seen += pairs
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", pairs_s=f"{pairs / max(elapsed, 1e-9):.1f}")
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == self.plan.total_steps):
                    record = {"step": self.step, "epoch": epoch, "train_loss": loss_value, "lr": lr,
                              "pairs_per_second": pairs / max(elapsed, 1e-9)}
                    record["peak_memory_gb"] = peak_memory_gb(self.device)
                    self.log_metrics(record)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    metrics, _ = self.evaluate()  # every rank encodes its share
                    if metrics is not None:
                        self.log_metrics({"step": self.step, **{f"val_{k}" if k != "val_loss" else k: v
                                                                for k, v in metrics.items()}})
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._save_or_warn()
                if self._stop_signal is not None:
                    return True
        return False

    def _step_or_skip_nonfinite(self, loss_value: float) -> None:
        cfg = self.config.train
        if math.isfinite(loss_value):
            self.nonfinite_in_row = 0
            self.optimizer_step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.step, self.nonfinite_in_row)
        if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
            raise TrainingError(
                f"{self.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_steps); "
                f"stopping. The last good checkpoint in {self.checkpoint_root} is intact; lower "
                f"train.lr or use precision fp32/bf16, then --resume.")
        self.scheduler.step()

    def _on_every_rank(self, condition: bool) -> bool:
        flag = torch.tensor([1 if condition else 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _save_or_warn(self) -> None:
        try:
            self.save()
        except OSError as err:
            log.error("checkpoint at step %d could not be written (%s); the previous one is intact, training goes on",
                      self.step, err)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _open_cache(config: RunConfig, preprocessing: Preprocessing):
    if not config.data.cache_dir:
        return None
    from cliptune.cache import ImageCache

    # Warns in the run log when the cached pixels are not exactly the model processor's.
    return ImageCache.open(Path(config.data.cache_dir), expect=preprocessing.image_transform())
