"""Activation memory of one training pair, per `random:` shape: what sizes each preset's micro-batch.

A LoRA step keeps the frozen weights once, whatever the batch, and what autograd saves for the
backward pass once per pair; with `train.accumulation: exact` only one micro-batch's worth is ever
alive. This counts the bytes autograd saves (each storage once, the model's own weights left out)
during one forward of one image and one caption, LoRA r=16 on attention + MLP of both towers as in
the presets, in fp32 on the CPU, with PEFT's own LoRA modules (what a GPU runs). Captions are
padded to the model's full context (77 CLIP, 64 SigLIP): CLIP captions are padded to the batch's
longest in training, so its text figure is an upper bound. Under bf16 autocast (the GPU default)
most saved tensors take half the bytes, so fp32 is the conservative figure.

Building ViT-L/14 or so400m with real fp32 weights takes 3.5 to 8.5 GB of RAM and up to a minute
(each shape runs in its own process, so one's memory is freed before the next).

    python benchmarks/activation_memory.py [--shapes random:clip-vit-b-16,random:clip-vit-l-14]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(name: str) -> dict:
    import torch

    from cliptune.config import LoraSettings, ModelConfig
    from cliptune.models.contrastive import load_model
    from cliptune.models.lora import apply_lora

    start = time.perf_counter()
    model, preprocessing = load_model(ModelConfig(name=name))
    counts = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.1, fast_path=False))
    model.train()
    build_seconds = time.perf_counter() - start
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    size, length = preprocessing.image_size, preprocessing.max_text_length
    pixels = torch.randn(1, 3, size, size)
    input_ids = torch.randint(1000, 2000, (1, length))
    attention_mask = torch.ones(1, length, dtype=torch.long)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(pixels, input_ids, attention_mask)
    return {"model": name, "image_size": size, "text_tokens": length, "total_params": counts.total,
            "weights_fp32_gib": round(counts.total * 4 / 2**30, 2),
            "activations_fp32_mib_per_pair": round(sum(saved.values()) / 2**20, 1),
            "build_s": round(build_seconds, 1), "forward_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    from cliptune.models.random_shapes import RANDOM_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(RANDOM_SHAPES), help="comma-separated random: names")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this shape, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    import platform

    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    for name in args.shapes.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
