"""The training recipe: `Trainer(config).setup()`, then `.train()` (which ends with `.cleanup()`).

`setup()` builds the model (`setup_model`), the training data (`setup_data`) and the optimizer, and
with `resume` restores the newest good checkpoint; `train()` runs the steps, validates, checkpoints,
saves the adapter and writes the report. Its parts work without it: accumulation.py (one step's
gradients, plain or exact), data.py (the plan and each epoch's batches), optimizer.py, parallel.py
(Accelerate and DDP), run_log.py (metrics.jsonl and the trackers), checkpoint.py, validation.py and
stopping.py (signals, `TrainingError`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cliptune.config import RunConfig, save_config
from cliptune.data.device_augment import DeviceAugment, augment_seed
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import ImageCaptions
from cliptune.evaluation.embedding import autocast_context
from cliptune.models.contrastive import ContrastiveModel, load_model
from cliptune.models.lora import ParameterCount, apply_lora, save_adapter
from cliptune.runtime import peak_memory_gb, resolve_precision
from cliptune.training import checkpoint
from cliptune.training.accumulation import (
    MicroBatch,
    accumulate_gradients,
    across_ranks,
    enable_gradient_checkpointing,
)
from cliptune.training.checkpoint import Counters
from cliptune.training.data import TrainingData, TrainPlan, plan_training  # noqa: F401  (public here too)
from cliptune.training.loss import contrastive_loss
from cliptune.training.optimizer import apply_gradients, build_optimizer
from cliptune.training.parallel import average_scale_grads, on_every_rank, start_accelerator, wrap_ddp
from cliptune.training.run_log import RunLog, trackers
from cliptune.training.stopping import StopSignals, TrainingError
from cliptune.training.validation import validate, zero_shot_metrics

log = logging.getLogger(__name__)


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


class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False, progress: bool = True):
        self.config, self.resume, self.progress = config, resume, progress
        self.output_dir = Path(config.train.output_dir)
        self.accelerator, self.device = start_accelerator(config.train, trackers(config.train))
        self.precision = resolve_precision(config.train.precision, self.device)
        self.run_log = RunLog(self.accelerator, self.output_dir)
        self.model: ContrastiveModel | None = None
        self.data: TrainingData | None = None
        self._augmenter: DeviceAugment | None = None  # made on first use, with data.augment.on_device
        self.counters = Counters()

    def setup_model(self) -> ParameterCount:
        """Load the model and adapt it (once); the CLI prints the parameter count before the data loads."""
        if self.model is None:
            self.model, self.preprocessing, self.parameters = self._setup_model()
            self.loss_fn = contrastive_loss(self.config, self.model.family)
        return self.parameters

    def setup_data(self) -> TrainPlan:
        """Read and check the training data (once); returns its plan."""
        if self.data is None:
            self.setup_model()  # captions are tokenised with the model's tokenizer
            self.data = self._setup_data()
        return self.data.plan

    def setup(self) -> None:
        """Model, data, optimizer and schedule; with `resume`, the newest good checkpoint's state."""
        self.setup_model()
        self.optimizer, self.scheduler = self._setup_optimizer(self.setup_data())
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.model.to(self.device)
        self.ddp_model = self._wrap_ddp()
        self.counters = Counters()
        if self.resume:
            self._restore()

    def _setup_model(self) -> tuple[ContrastiveModel, Preprocessing, ParameterCount]:
        cfg = self.config
        torch.manual_seed(cfg.train.seed)  # new layers (LoRA A, composed heads) start the same every run
        model, preprocessing = load_model(cfg.model)
        parameters = apply_lora(model, cfg.lora)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model, preprocessing, parameters

    def _setup_data(self) -> TrainingData:
        return TrainingData.load(self.config, self.preprocessing, self.accelerator, pin_memory=self.device.type == "cuda")

    def _setup_optimizer(self, plan: TrainPlan) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        trainable = list(self._trainable_state().values())
        return build_optimizer(trainable, self.config.train, plan.total_steps, self.device)

    def _wrap_ddp(self) -> torch.nn.Module:
        return wrap_ddp(self.model, self.accelerator)

    @property
    def plan(self) -> TrainPlan:
        return self.data.plan

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def pairs_seen(self) -> int:
        return self.counters.pairs_seen

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        counters = {**dataclasses.asdict(self.counters), "total_steps": self.plan.total_steps,
                    "world_size": self.accelerator.num_processes}
        state = checkpoint.training_state(self.optimizer, self.scheduler, self.scaler, self.device)
        return checkpoint.save_checkpoint(self.output_dir / "checkpoints", self.step, self._trainable_state(), state,
                                          counters, self.config.train.keep_checkpoints)

    def _restore(self) -> None:
        root = self.output_dir / "checkpoints"
        latest = checkpoint.load_latest_checkpoint(root)
        if latest is None:
            log.warning("--resume: no usable checkpoint in %s; starting from step 0", root)
            return
        self.counters = checkpoint.restore_training(latest, self._trainable_state(), self.optimizer,
                                                    self.scheduler, self.scaler, self.device)
        self.run_log.truncate(self.step)
        log.info("resumed from %s (step %d of %d)", latest.path, self.step, self.plan.total_steps)

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """Forward + backward over one optimizer step's micro-batches; returns the loss (detached)."""
        inputs = [MicroBatch.on_device(batch, self.preprocessing, self.device, self._device_augment(i))
                  for i, batch in enumerate(micro_batches)]
        loss = self._batch_loss if self.accelerator.num_processes == 1 else across_ranks(self._batch_loss)
        return accumulate_gradients(inputs, self._encode, loss, exact=self.config.train.accumulation == "exact",
                                    device=self.device, scale=self.scaler.scale if self.scaler is not None else None,
                                    no_sync=None if self.ddp_model is self.model else self.ddp_model.no_sync)

    def _device_augment(self, micro: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Micro-batch `micro` of this step's augmentation on the device (`data.augment.on_device`), or None.
        Its draws are a function of (seed, step, micro-batch, rank), so a resumed run augments alike."""
        if self.data is None or not self.data.augments_on_device:
            return None
        if self._augmenter is None:
            self._augmenter = DeviceAugment(self.config.data.augment, self.preprocessing.image_size,
                                            self.preprocessing.resize_rule)
        seed = augment_seed(self.config.train.seed, "device-augment", self.step, micro, self.accelerator.process_index)
        return functools.partial(self._augmenter, generator=torch.Generator().manual_seed(seed))

    def _encode(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        with autocast_context(self.device, self.precision):
            return self.ddp_model(pixels, input_ids, attention_mask)

    def _batch_loss(self, image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(image, text, self.model, image_ids)

    def _sync_scale_grads(self) -> None:
        average_scale_grads(self.model, self.accelerator)

    def optimizer_step(self) -> float | None:
        """Clip, step, schedule. Returns the gradient norm (None when clipping is off)."""
        self._sync_scale_grads()
        trainable = list(self._trainable_state().values())
        return apply_gradients(self.optimizer, self.scheduler, self.scaler, trainable, self.config.train.max_grad_norm)

    def _skip_step(self) -> None:
        """A step that changes no weight and no optimizer state; the schedule still advances."""
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.skipped_steps += 1
        self.scheduler.step()

    def _step_or_skip_nonfinite(self, loss_value: float) -> None:
        counters = self.counters
        counters.nonfinite_in_row = 0 if math.isfinite(loss_value) else counters.nonfinite_in_row + 1
        if counters.nonfinite_in_row == 0:
            self.optimizer_step()
            return
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.step, counters.nonfinite_in_row)
        if counters.nonfinite_in_row >= self.config.train.max_nonfinite_steps:
            raise TrainingError(
                f"{counters.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_steps); stopping. "
                f"The last good checkpoint in {self.output_dir / 'checkpoints'} is intact; lower train.lr or use "
                f"precision fp32/bf16, then --resume.")
        self._skip_step()

    def evaluate(self, records: list[ImageCaptions] | None = None):
        """Metrics and embeddings of the val split (or of `records`); (None, None) without images. Under
        several processes every rank must call it."""
        image_source = None
        if records is None:
            records, image_source = self.data.val_records, self.data.image_source
        if not records:
            return None, None
        metrics, embeddings = validate(self.model, records, self.preprocessing, self._batch_loss, self.config,
                                       self.device, self.precision, self.accelerator.process_index,
                                       self.accelerator.num_processes, image_source)
        self.model.train()
        return metrics, embeddings

    def log_metrics(self, record: dict) -> None:
        self.run_log.log(record)

    def train(self) -> TrainResult:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.output_dir / "config.yaml")
        self.run_log.start(self.config)
        try:
            return self._train()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Close the trackers; `train()` does, however it ends."""
        self.run_log.close()

    def _train(self) -> TrainResult:
        cfg, main = self.config.train, self.accelerator.is_main_process
        results: dict[str, dict[str, float]] = {}
        if cfg.report and self.data.val_records:
            zero_shot = zero_shot_metrics(self.output_dir / "zeroshot_metrics.json", self.evaluate, self.accelerator)
            if zero_shot is not None:  # None: read back on rank 0 only
                results["zero-shot"] = zero_shot
        self.model.train()
        with StopSignals() as stop:
            bar = tqdm(total=self.plan.total_steps, initial=self.step, desc="training", dynamic_ncols=True,
                       disable=not (self.progress and main))
            try:
                interrupted = self._loop(bar, stop)
            finally:
                bar.close()
        if interrupted:
            path = self.save()
            log.warning("interrupted by signal %s at step %d; checkpoint %s. Resume with: cliptune train --config "
                        "%s --resume", stop.received, self.step, path, self.output_dir / "config.yaml")
            return self._result(results, interrupted=True)
        if main:
            if cfg.save_every == 0 or self.step % cfg.save_every != 0:
                self.save()
            save_adapter(self.model, self.output_dir / "adapter")
        embeddings = None
        if cfg.report and self.data.val_records:
            results["fine-tuned"], embeddings = self.evaluate()
            if main:
                (self.output_dir / "metrics.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        result = self._result(results, interrupted=False)
        if cfg.report and main:
            from cliptune.evaluation.report import RunSummary, write_run_report

            write_run_report(RunSummary(
                config=self.config, parameters=result.parameters, steps=result.steps,
                train_seconds=result.train_seconds, pairs_per_second=result.pairs_per_second,
                skipped_steps=result.skipped_steps, results=result.results, bad_images=result.bad_images,
                loss=self.loss_fn.kind, precision=self.precision, device=str(self.device),
                data_notes=self.data.notes(), history=self.run_log.history(), val_records=self.data.val_records,
                val_embeddings=embeddings))
        return result

    def _result(self, results: dict[str, dict[str, float]], interrupted: bool) -> TrainResult:
        c = self.counters
        pairs_per_second = c.pairs_seen / c.train_seconds if c.train_seconds > 0 else 0.0
        return TrainResult(self.output_dir, self.output_dir / "adapter", c.step, c.train_seconds, pairs_per_second,
                           self.parameters, results, interrupted, c.skipped_steps, list(self.data.bad_images))

    def _loop(self, bar: tqdm, stop: StopSignals) -> bool:
        """Run steps until done; True if a signal asked us to stop (after finishing the current step)."""
        cfg, plan, c, world = self.config.train, self.plan, self.counters, self.accelerator.num_processes
        while c.step < plan.total_steps:
            epoch, start = divmod(c.step, plan.steps_per_epoch)
            steps = self.data.steps(epoch, start)
            for _ in range(start, plan.steps_per_epoch):
                if c.step >= plan.total_steps:
                    break
                # Read before the step: stepping the scheduler already moves it to the next step's lr.
                lr = self.scheduler.get_last_lr()[0]
                started = time.perf_counter()  # end to end: waiting for the loader counts
                fetched = next(steps)
                micro = self.data.keep_readable(fetched)
                # The step's collectives run once per micro-batch on every rank: a rank that lost a whole
                # micro-batch to unreadable images would leave the others waiting. All skip the step.
                if not on_every_rank(len(micro) == len(fetched), self.accelerator, self.device):
                    micro = []
                if not micro:
                    log.warning("step %d skipped: a micro-batch had no readable image", c.step)
                    self._skip_step()
                    loss_value = float("nan")
                else:
                    loss = self.accelerator.reduce(self.train_step(micro).to(self.device), reduction="mean")
                    loss_value = float(loss)
                    self._step_or_skip_nonfinite(loss_value)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - started
                pairs = sum(len(b["image_ids"]) for b in micro) * world
                c.train_seconds += elapsed
                c.pairs_seen += pairs
                c.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", pairs_s=f"{pairs / max(elapsed, 1e-9):.1f}")
                if cfg.log_every and (c.step % cfg.log_every == 0 or c.step == plan.total_steps):
                    self.log_metrics({"step": c.step, "epoch": epoch, "train_loss": loss_value, "lr": lr,
                                      "pairs_per_second": pairs / max(elapsed, 1e-9),
                                      "peak_memory_gb": peak_memory_gb(self.device)})
                if cfg.eval_every and c.step % cfg.eval_every == 0:
                    metrics, _ = self.evaluate()  # every rank encodes its share
                    if metrics is not None:
                        self.log_metrics({"step": c.step, **{k if k == "val_loss" else f"val_{k}": v
                                                             for k, v in metrics.items()}})
                if cfg.save_every and c.step % cfg.save_every == 0:
                    self._save_or_warn()
                if stop.received is not None:
                    return True
        return False

    def _save_or_warn(self) -> None:
        try:
            self.save()
        except OSError as err:
            log.error("checkpoint at step %d could not be written (%s); the previous one is intact, training goes on",
                      self.step, err)
