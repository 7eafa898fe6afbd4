"""`cliptune bench`: how fast cliptune's path is, each number beside the naive loop measured in the same run.

The naive loop is the seed notebook's: decode the JPEG in the training loop and run HF's
`CLIPImageProcessor`, pad every caption to the full context (77 tokens for CLIP), use `CLIPModel(..., return_loss=True)`, fp32.
cliptune's path: uint8 pixels read from the image cache (`cliptune.data.cache`), captions padded to the
batch's longest, `cliptune.training.loss.clip_loss`, on a CPU `cliptune.models.fast_lora` (cheaper dropout masks
and a fused LoRA branch; PEFT's own modules in the naive loop), and bf16 autocast when it measures
faster here.
Timings on a shared machine are noisy: compare the ratios (`speedup_*`), which come from one run.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cliptune.apps.bench_trainer import TrainerBenchRequest, measure
from cliptune.apps.timing import bf16_matmul_speedup, interleaved_rates
from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS, DataConfig, LoraSettings, ModelConfig, UsageError
from cliptune.data.batches import PairCollator, PairDataset, StepBatchSampler, epoch_pairs, tokenize_captions
from cliptune.data.cache import ImageCache, build_cache
from cliptune.data.images import ImageTransform, normalize_pixels, open_rgb
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import ImageCaptions, read_split
from cliptune.evaluation.embedding import autocast_context, embed_images, embed_texts
from cliptune.models.contrastive import RANDOM_VIT_B_32, load_model
from cliptune.models.fast_lora import use_fast_lora
from cliptune.models.lora import apply_lora
from cliptune.runtime import peak_memory_gb, resolve_device
from cliptune.training.loss import clip_loss

log = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    model: str = RANDOM_VIT_B_32
    """Model to time: `random:clip-vit-b-32` (ViT-B/32 shapes, no download) or a CLIP folder / hub id."""
    data: Path | None = None
    """Annotations whose train split is timed (any format `data.path` takes), or a folder with COCO's
    `captions_train.json` and its images. Required: the figures depend on the photos (JPEG decode cost),
    so the bench never picks a folder by itself."""
    device: str = "auto"
    batch: int = 8
    """Micro-batch of the training step (pairs)."""
    eval_batch: int = 32
    steps: int | None = None
    """Timed steps per measurement (after one warm-up). Default 1 with `short`, else 6."""
    short: bool = False
    """Tiny step and image counts: a smoke test that finishes in well under a minute on a CPU."""
    sweep: bool = False
    """Also time channels-last and torch.compile (slow to compile) on the model-only step."""
    cache_size: int | None = None
    """Side of the cached squares; default the model input + 1/7 (256 for 224)."""
    workers: int = 0
    """DataLoader workers of cliptune's end-to-end path (cache reads are cheap; 0 leaves the cores to the model)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    trainer_only: bool = False
    """Run only the seed-loop-vs-Trainer section (`cliptune.apps.bench_trainer`), `steps` optimizer steps each."""


def _image_processor(preprocessing: Preprocessing):
    import transformers

    size = preprocessing.image_size
    return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                           image_mean=list(preprocessing.image_mean),
                                           image_std=list(preprocessing.image_std))


def _naive_decode(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class _Bench:
    def __init__(self, options: BenchOptions):
        self.options = options
        self.device = resolve_device(options.device)  # the CLI flag is --train.device, as everywhere
        self.steps = options.steps or (1 if options.short else 6)
        self.warmup = 1
        self.results: dict = {}

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, cache_dir: Path) -> None:
        opts = self.options
        records, _ = read_split(DataConfig(path=str(_source(opts))), "train")
        records = records[:16] if opts.short else records
        # A batch larger than the data set (batch 256 on a GPU) repeats images: each copy is its own pair.
        self.records: list[ImageCaptions] = records * -(-opts.batch // len(records))
        torch.manual_seed(0)
        self.model, self.preprocessing = load_model(ModelConfig(name=opts.model))
        if self.model.family != "clip":
            raise ValueError(f"bench: {opts.model!r} is a {self.model.family} model; the naive baseline "
                             "(CLIPModel(return_loss=True)) needs a CLIP model")
        self.parameters = apply_lora(self.model, opts.lora)
        log.info("bench: model loaded (%s)", self.parameters)
        self.model.to(self.device).train()
        self.size = self.preprocessing.image_size
        cache_size = opts.cache_size or self.size * 8 // 7
        started = time.perf_counter()
        stats = build_cache(self.records, cache_dir, cache_size, workers=os.cpu_count(), progress=False)
        self.results["cache_build_images_per_s"] = round(stats.total / (time.perf_counter() - started), 1)
        self.cache = ImageCache.open(cache_dir)
        if cache_size != self.size:  # a cache at the input size makes the transform a copy: no resize
            build_cache(self.records, cache_dir / "exact", self.size, workers=os.cpu_count(), progress=False)
            self.cache_exact = ImageCache.open(cache_dir / "exact")
        else:
            self.cache_exact = self.cache
        self.processor = _image_processor(self.preprocessing)
        self.tokens = tokenize_captions(self.records, self.preprocessing)
        self.transform = ImageTransform(self.size)

    def _optimizer(self, fused: bool) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=1e-5, fused=fused or None)

    def _batch_records(self, step: int) -> list[ImageCaptions]:
        start = (step * self.options.batch) % len(self.records)
        return [self.records[(start + i) % len(self.records)] for i in range(self.options.batch)]

    # -- input pipeline ---------------------------------------------------------------------------------

    def input_pipeline(self) -> None:
        paths = [r.image_path for r in self.records]
        transform, size, processor = self.transform, self.size, self.processor
        max_pixels = DEFAULT_MAX_IMAGE_PIXELS

        def loop(fn):
            def run():
                for path in paths:
                    fn(path)
                return len(paths)
            return run

        fns = {
            "naive_pil_clipimageprocessor": loop(lambda p: processor(images=_naive_decode(p), return_tensors="pt")),
            "decode_open_rgb_transform": loop(lambda p: transform(open_rgb(p, max_pixels))),
            "decode_draft_open_rgb_transform": loop(lambda p: transform(open_rgb(p, max_pixels, draft_size=2 * size))),
            "cache_get_pil_transform": loop(lambda p: transform(self.cache.get_pil(p))),
            "cache_at_input_size_get_pil_transform": loop(lambda p: transform(self.cache_exact.get_pil(p))),
            "cache_get_array": loop(lambda p: torch.from_numpy(self.cache.get_array(p))),
        }
        rates = interleaved_rates(fns, 1 if self.options.short else 2, 0 if self.options.short else 1,
                                  torch.device("cpu"))
        out = {name: round(rate, 1) for name, rate in rates.items()}
        self.results["input_images_per_s"] = out
        self.results["speedup_cache_read_vs_decode"] = round(out["cache_get_array"] / out["decode_open_rgb_transform"], 1)
        self.results["speedup_cache_transform_vs_decode"] = round(
            out["cache_get_pil_transform"] / out["decode_open_rgb_transform"], 1)
        self.results["speedup_cache_at_input_size_transform_vs_decode"] = round(
            out["cache_at_input_size_get_pil_transform"] / out["decode_open_rgb_transform"], 1)
        self.results["speedup_cache_transform_vs_naive"] = round(
            out["cache_get_pil_transform"] / out["naive_pil_clipimageprocessor"], 1)

    # -- training step on pre-made tensors ----------------------------------------------------------------

    def _naive_tensors(self, records: list[ImageCaptions]) -> dict[str, torch.Tensor]:
        pixels = self.processor(images=[_naive_decode(r.image_path) for r in records], return_tensors="pt")
        text = self.preprocessing.tokenizer([r.captions[0] for r in records], padding="max_length", truncation=True,
                                            max_length=self.preprocessing.max_text_length, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"]}

    def _naive_step(self, optimizer, batch: dict[str, torch.Tensor]) -> int:
        self._lora_path(fast=False)  # the seed's PEFT: lora.Linear with nn.Dropout
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = self.model.net(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(batch["input_ids"])

    def _lora_path(self, fast: bool) -> None:
        # Swapping walks every module, a cost that would land in the timed step: only when the kind changes.
        if getattr(self, "_fast_lora", None) != fast:
            use_fast_lora(self.model, fast)
            self._fast_lora = fast

    def _fast_tensors(self, step: int) -> dict[str, torch.Tensor]:
        batch = PairCollator(self.tokens)([self._dataset()[(0, i, 0)] for i in self._batch_indices(step)])
        return batch

    def _batch_indices(self, step: int) -> list[int]:
        start = (step * self.options.batch) % len(self.records)
        return [(start + i) % len(self.records) for i in range(self.options.batch)]

    def _dataset(self) -> PairDataset:
        return PairDataset(self.records, self.tokens, self.transform, 0, DEFAULT_MAX_IMAGE_PIXELS, image_source=self.cache)

    def _fast_step(self, optimizer, batch: dict, precision: str, channels_last: bool = False, model=None,
                   fast_lora: bool = True) -> int:
        self._lora_path(fast=fast_lora)
        model = model if model is not None else self.model
        pixels = normalize_pixels(batch["pixels"].to(self.device, non_blocking=True),
                                  self.preprocessing.image_mean, self.preprocessing.image_std)
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, precision):
            image, text = model(pixels, batch["input_ids"].to(self.device, non_blocking=True),
                                batch["attention_mask"].to(self.device, non_blocking=True))
        ids = batch["image_ids"].to(self.device)
        loss = clip_loss(image, text, self.model.logit_scale.exp(), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(ids)

    def model_step(self) -> None:
        fused = self.device.type == "cuda"
        naive_batch = self._naive_tensors(self._batch_records(0))
        fast_batch = self._fast_tensors(0)
        probe = bf16_matmul_speedup(self.device)
        self.results["bf16_matmul_speedup_probe"] = round(probe, 3)
        if self.device.type == "cuda":
            candidates = ["bf16"] if torch.cuda.is_bf16_supported() else ["fp32"]
        else:
            candidates = ["fp32", "bf16"] if probe > 0.8 else ["fp32"]  # emulated bf16 is not worth timing
        naive_optimizer = self._optimizer(False)
        fns = {"naive_fp32_pad77_return_loss": lambda: self._naive_step(naive_optimizer, naive_batch)}
        for precision in candidates:
            optimizer = self._optimizer(fused)
            fns[f"cliptune_{precision}"] = (lambda o, p: lambda: self._fast_step(o, fast_batch, p))(optimizer, precision)
        if self.device.type == "cuda":
            unfused = self._optimizer(False)
            fns["cliptune_bf16_unfused_adamw"] = lambda: self._fast_step(unfused, fast_batch, "bf16")
        else:  # what cliptune.models.fast_lora adds on a CPU, timed beside the rest
            peft_lora = self._optimizer(fused)
            fns["cliptune_fp32_peft_lora"] = lambda: self._fast_step(peft_lora, fast_batch, "fp32", fast_lora=False)
        memory: dict[str, float] = {}
        rates = interleaved_rates(fns, self.steps, self.warmup, self.device, memory)
        self.precision = max(candidates, key=lambda p: rates[f"cliptune_{p}"])
        if self.options.sweep:
            # Interleaved with the plain fast path again: two separate runs are not comparable on a shared machine.
            plain, last = self._optimizer(fused), self._optimizer(fused)
            pair = interleaved_rates({"plain": lambda: self._fast_step(plain, fast_batch, self.precision),
                                      "channels_last": lambda: self._fast_step(last, fast_batch, self.precision,
                                                                               channels_last=True)},
                                     self.steps, self.warmup, self.device)
            self.results["speedup_channels_last"] = round(pair["channels_last"] / pair["plain"], 2)
            optimizer = self._optimizer(fused)
            try:
                compiled = torch.compile(self.model)
                started = time.perf_counter()
                self._fast_step(optimizer, fast_batch, self.precision, model=compiled)
                self.results["torch_compile_first_step_s"] = round(time.perf_counter() - started, 1)

                def compiled_step() -> int:
                    return self._fast_step(optimizer, fast_batch, self.precision, model=compiled)

                rates.update(interleaved_rates({f"cliptune_{self.precision}_torch_compile": compiled_step},
                                               self.steps, self.warmup, self.device))
            except Exception as err:  # compile needs a C++ toolchain; report instead of failing the bench
                self.results["torch_compile_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        self.results["train_step_model_only_pairs_per_s"] = {k: round(v, 2) for k, v in rates.items()}
        self.results["fast_path_precision"] = self.precision
        self.results["speedup_train_model_only"] = round(
            rates[f"cliptune_{self.precision}"] / rates["naive_fp32_pad77_return_loss"], 2)
        self.results["speedup_fast_lora_model_only"] = (
            round(rates["cliptune_fp32"] / rates["cliptune_fp32_peft_lora"], 2)
            if "cliptune_fp32_peft_lora" in rates else None)
        self.results["speedup_bf16_vs_fp32_model_only"] = (
            round(rates["cliptune_bf16"] / rates["cliptune_fp32"], 2)
            if "cliptune_fp32" in rates and "cliptune_bf16" in rates else None)
        self.results["peak_memory_mb_train_step"] = memory

    # -- end to end: data loading + step ----------------------------------------------------------------

    def end_to_end(self) -> None:
        fused = self.device.type == "cuda"
        counter = iter(range(10**9))

        def naive():
            optimizer = naive.optimizer
            return self._naive_step(optimizer, self._naive_tensors(self._batch_records(next(counter))))

        batches = self._fast_batches()

        def fast():
            return self._fast_step(fast.optimizer, next(batches), self.precision)

        naive.optimizer, fast.optimizer = self._optimizer(False), self._optimizer(fused)
        memory: dict[str, float] = {}
        rates = interleaved_rates({"naive": naive, "cliptune": fast}, self.steps, self.warmup, self.device, memory)
        self.results["train_end_to_end_pairs_per_s"] = {k: round(v, 2) for k, v in rates.items()}
        self.results["speedup_train_end_to_end"] = round(rates["cliptune"] / rates["naive"], 2)
        self.results["peak_memory_mb_end_to_end"] = memory

    def _fast_batches(self) -> Iterator[dict]:
        """The trainer's loader (PairDataset over the cache, StepBatchSampler, PairCollator), epoch after epoch."""
        from torch.utils.data import DataLoader

        dataset = self._dataset()
        steps_per_epoch = len(self.records) // self.options.batch
        for epoch in range(10**6):
            pairs = epoch_pairs(self.records, "sample", 0, epoch)
            sampler = StepBatchSampler(pairs, epoch, steps_per_epoch, 0, self.options.batch, 1, 0, 1)
            yield from DataLoader(dataset, batch_sampler=sampler, collate_fn=PairCollator(self.tokens),
                                  num_workers=self.options.workers, pin_memory=self.device.type == "cuda",
                                  generator=torch.Generator())

    # -- evaluation encoding ----------------------------------------------------------------------------

    def evaluation(self) -> None:
        records = self.records[: 8 if self.options.short else 64]
        texts = [r.captions[0] for r in records]
        batch = self.options.eval_batch
        net = self.model.net

        @torch.no_grad()
        def naive():
            self.model.eval()
            for start in range(0, len(records), batch):
                chunk = records[start: start + batch]
                pixels = self.processor(images=[_naive_decode(r.image_path) for r in chunk], return_tensors="pt")
                net.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
                text = self.preprocessing.tokenizer(texts[start: start + batch], padding="max_length", truncation=True,
                                                    max_length=self.preprocessing.max_text_length, return_tensors="pt")
                net.get_text_features(input_ids=text["input_ids"].to(self.device),
                                      attention_mask=text["attention_mask"].to(self.device))
            return len(records)

        def fast():
            embed_images(self.model, records, self.preprocessing, self.device, batch, 0, precision=self.precision,
                         image_source=self.cache, progress=False)
            embed_texts(self.model, texts, self.preprocessing, self.device, batch, self.precision, progress=False)
            return len(records)

        rates = interleaved_rates({"naive": naive, "cliptune": fast}, 1 if self.options.short else 2,
                                  0 if self.options.short else 1, self.device)
        self.model.train()
        self.results["eval_encode_pairs_per_s"] = {k: round(v, 2) for k, v in rates.items()}
        self.results["speedup_eval_encode"] = round(rates["cliptune"] / rates["naive"], 2)


def _source(opts: BenchOptions) -> Path:
    if opts.data is None:
        raise UsageError("bench: no data: give --data.path, annotations or a folder with captions_train.json "
                         "and its images (the README's figures: ../shared/data/coco-mini)")
    # A folder is read as COCO's layout; anything else is an annotation source, as data.path is everywhere.
    return Path(opts.data) / "captions_{split}.json" if Path(opts.data).is_dir() else Path(opts.data)


def run_bench(options: BenchOptions) -> dict:
    """Run every measurement and return one JSON-ready dict (see docs/speed.md for the keys)."""
    started = time.perf_counter()
    random.seed(0)
    np.random.seed(0)
    bench = _Bench(options)
    source = _source(options)
    with tempfile.TemporaryDirectory(prefix="cliptune-bench-") as cache_dir:
        if options.trainer_only:
            bench.records, bench.parameters = [], None
        else:
            bench.setup(Path(cache_dir))
        bench.results.update({
            "model": options.model, "device": str(bench.device), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else None,
            "micro_batch": options.batch, "timed_steps": bench.steps, "images": len(bench.records) or None,
            "trainable_parameters": bench.parameters and bench.parameters.trainable,
            "total_parameters": bench.parameters and bench.parameters.total, "short": options.short,
        })
        for phase in () if options.trainer_only else (bench.input_pipeline, bench.model_step, bench.end_to_end,
                                                      bench.evaluation):
            log.info("bench: %s (%.0f s so far)", phase.__name__, time.perf_counter() - started)
            phase()
        bench.__dict__.pop("cache", None)
        bench.__dict__.pop("model", None)  # the section below loads its own three models
    log.info("bench: seed loop vs Trainer (%.0f s so far)", time.perf_counter() - started)
    bench.results.update(measure(TrainerBenchRequest(options.model, str(source), options.device, bench.steps,
                                                     options.batch, workers=options.workers)))
    if bench.device.type == "cpu":
        bench.results["peak_rss_mb_process"] = round(peak_memory_gb(bench.device) * 1024)
    bench.results["bench_seconds"] = round(time.perf_counter() - started, 1)
    return bench.results


__all__ = ["BenchOptions", "run_bench"]
