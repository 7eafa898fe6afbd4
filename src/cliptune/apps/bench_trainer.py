"""The bench of the real thing: the seed notebook's loop beside `cliptune train`'s own `Trainer`, on one
data set, for the same optimizer steps, in one run.

1. `seed_loop`: the notebook as written: PIL open + `CLIPImageProcessor` per item, each caption padded to
   the model's full context, `CLIPModel(..., return_loss=True)`, fp32, PEFT LoRA (r 16, alpha 32, dropout
   0.1 on q/k/v/out_proj/fc1/fc2 of both towers), AdamW lr 1e-4, plain accumulation: loss / accum,
   backward per micro-batch, one optimizer step every `accum` micro-batches.
2. `trainer_default`: `cliptune.training.recipe.Trainer` with the default config (exact accumulation).
3. `trainer_plain`: the same with `train.accumulation: plain`.

Rates are pairs over the wall time from the end of the first (warm-up) optimizer step to the end of the
last, alike for all three: model load, data setup and the warm-up step are not timed.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from cliptune.config import DataConfig, ModelConfig, load_config
from cliptune.data.readers import ImageCaptions, read_split
from cliptune.models.contrastive import load_model
from cliptune.runtime import resolve_device

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class TrainerBenchRequest:
    model: str
    source: str
    """data.path as the Trainer reads it (a `captions_{split}.json` pattern or an annotation file)."""
    device: str = "auto"
    steps: int = 3
    """Timed optimizer steps per side, after one warm-up step."""
    micro_batch: int = 8
    accum: int = 4
    workers: int = 0


@dataclass
class SeedTrace:
    """What the seed loop really ran, seen by hooks on the model and the optimizer (not by its own counters)."""
    forwards: int = 0
    optimizer_steps: int = 0
    text_lengths: set[int] = field(default_factory=set)


def cpu_facts() -> dict:
    """What the CPU figures ran on: model name, torch's kernel level, bf16 matmul support, threads."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    return {"cpu_model": name, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_avx512_bf16": "avx512_bf16" in flags, "cpu_amx_bf16": "amx_bf16" in flags,
            "cpu_threads": torch.get_num_threads()}


def _rate(ends: list[float], pairs_per_step: int) -> float:
    if len(ends) < 2:
        raise RuntimeError(f"bench: only {len(ends)} optimizer steps ran; the rate needs a warm-up step and one more")
    return (len(ends) - 1) * pairs_per_step / (ends[-1] - ends[0])


def seed_loop(request: TrainerBenchRequest, trace: SeedTrace) -> float:
    """The notebook's loop for 1 + `steps` optimizer steps; returns timed pairs/s."""
    import peft
    import transformers

    device = resolve_device(request.device)
    records, _ = read_split(DataConfig(path=request.source), "train")
    torch.manual_seed(0)
    loaded, preprocessing = load_model(ModelConfig(name=request.model))
    if loaded.family != "clip":
        raise ValueError(f"bench: {request.model!r} is a {loaded.family} model; the seed loop needs a CLIP model")
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=SEED_TARGETS)
    model = peft.get_peft_model(loaded.net, lora).to(device).train()
    size = preprocessing.image_size
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                crop_size={"height": size, "width": size},
                                                image_mean=list(preprocessing.image_mean),
                                                image_std=list(preprocessing.image_std))
    tokenizer, context = preprocessing.tokenizer, preprocessing.max_text_length
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def seen(_module, _args, kwargs) -> None:
        trace.forwards += 1
        trace.text_lengths.add(kwargs["input_ids"].shape[1])

    model.get_base_model().register_forward_pre_hook(seen, with_kwargs=True)
    optimizer.register_step_post_hook(lambda *_: setattr(trace, "optimizer_steps", trace.optimizer_steps + 1))
    rng = random.Random(0)
    order: list[ImageCaptions] = []

    def item() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not order:
            order.extend(rng.sample(records, len(records)))
        record = order.pop()
        with Image.open(record.image_path) as image:
            pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        text = tokenizer(rng.choice(record.captions), padding="max_length", truncation=True, max_length=context,
                         return_tensors="pt")
        return pixels, text["input_ids"][0], text["attention_mask"][0]

    ends: list[float] = []
    for _ in range(1 + request.steps):
        for _ in range(request.accum):
            pixels, ids, mask = (torch.stack(t) for t in zip(*(item() for _ in range(request.micro_batch))))
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels.to(device),
                        return_loss=True)
            (out.loss / request.accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        ends.append(time.perf_counter())
    return _rate(ends, request.micro_batch * request.accum)


def trainer_run(request: TrainerBenchRequest, accumulation: str) -> tuple[float, str]:
    """`cliptune train`'s Trainer (default config but for the bench's knobs) for 1 + `steps` steps:
    timed pairs/s and the precision it chose."""
    from cliptune.training.recipe import Trainer

    with tempfile.TemporaryDirectory(prefix="cliptune-bench-train-") as out:
        config = load_config(None, {
            "model.name": request.model, "data.path": request.source, "data.num_workers": request.workers,
            "train.device": request.device, "train.micro_batch_size": request.micro_batch,
            "train.grad_accum_steps": request.accum, "train.accumulation": accumulation,
            "train.max_steps": 1 + request.steps, "train.report": False, "train.report_to": ["none"],
            "train.save_every": 0, "train.output_dir": out})
        torch.manual_seed(0)
        trainer = Trainer(config, progress=False)
        trainer.setup()
        ends: list[float] = []
        step: Callable[[], float | None] = trainer.optimizer_step

        def timed_step() -> float | None:
            norm = step()
            _sync(trainer.device)
            ends.append(time.perf_counter())
            return norm

        trainer.optimizer_step = timed_step  # type: ignore[method-assign]
        trainer.train()
        return _rate(ends, request.micro_batch * request.accum), trainer.precision


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(request: TrainerBenchRequest) -> dict:
    """The three rates and their ratios, as bench JSON keys."""
    trace = SeedTrace()
    seed = seed_loop(request, trace)
    default, precision = trainer_run(request, "exact")
    plain, _ = trainer_run(request, "plain")
    return {
        "trainer_bench": {"timed_optimizer_steps": request.steps, "warmup_steps_excluded": 1,
                          "micro_batch": request.micro_batch, "grad_accum_steps": request.accum,
                          "pairs_per_side": request.steps * request.micro_batch * request.accum,
                          "data_workers": request.workers},
        "seed_loop_pairs_per_s": round(seed, 2), "trainer_default_pairs_per_s": round(default, 2),
        "trainer_plain_pairs_per_s": round(plain, 2),
        "speedup_trainer_default_vs_seed_loop": round(default / seed, 2),
        "speedup_trainer_plain_vs_seed_loop": round(plain / seed, 2),
        "trainer_precision": precision,
        "seed_loop_forwards": trace.forwards, "seed_loop_optimizer_steps": trace.optimizer_steps,
        "seed_loop_text_lengths": sorted(trace.text_lengths),
        **cpu_facts(),
    }


__all__ = ["TrainerBenchRequest", "SeedTrace", "cpu_facts", "measure", "seed_loop", "trainer_run"]
