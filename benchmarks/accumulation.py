"""Peak memory and pairs/s of plain vs exact (GradCache) accumulation vs one big batch.

ViT-B/32 shapes (random weights: speed and memory do not depend on their values), LoRA r=16 on
both towers, the real coco-mini photos and captions. Each mode runs in its own process so the
peak memory (GPU: max allocated; CPU: peak RSS) is that mode's alone.

    python benchmarks/accumulation.py [--data ../shared/data/coco-mini] [--steps 3] [--micro 8] [--accum 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def run_mode(mode: str, data: str, steps: int, micro: int, accum: int) -> dict:
    import torch

    from cliptune.config import load_config
    from cliptune.runtime import peak_memory_gb
    from cliptune.training.recipe import Trainer

    micro_batch, accum_steps, accumulation = {
        "plain": (micro, accum, "plain"), "exact": (micro, accum, "exact"),
        "big-batch": (micro * accum, 1, "exact"), "big-batch-checkpointed": (micro * accum, 1, "exact")}[mode]
    config = load_config(None, {
        "model.name": "random:clip-vit-b-32", "data.path": f"{data}/captions_{{split}}.json",
        "train.micro_batch_size": micro_batch, "train.grad_accum_steps": accum_steps,
        "train.accumulation": accumulation, "train.report": False, "data.num_workers": 0,
        "data.captions": "all",  # 400 pairs an epoch: enough steps without a second epoch
        "train.gradient_checkpointing": mode == "big-batch-checkpointed",
        "train.output_dir": "/tmp/cliptune-accumulation-bench"})
    trainer = Trainer(config, progress=False)
    trainer.setup()
    loader = iter(trainer.data.loader(0, 0))
    batches = [next(loader) for _ in range(accum_steps * (steps + 1))]
    steps_done, pairs, seconds = 0, 0, 0.0
    for step in range(steps + 1):  # the first step warms up and is not timed
        micro_batches = batches[step * accum_steps:(step + 1) * accum_steps]
        start = time.perf_counter()
        trainer.train_step(micro_batches)
        trainer.optimizer_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            seconds += time.perf_counter() - start
            pairs += sum(len(b["image_ids"]) for b in micro_batches)
            steps_done += 1
    return {"mode": mode, "micro_batch": micro_batch, "accumulation_steps": accum_steps,
            "negatives_per_pair": micro * accum - 1 if mode != "plain" else micro - 1,
            "pairs_per_second": round(pairs / seconds, 2), "peak_memory_gb": round(peak_memory_gb(trainer.device), 2),
            "device": str(trainer.device), "timed_steps": steps_done}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/coco-mini")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.data, args.steps, args.micro, args.accum)))
        return
    rows = []
    for mode in ("plain", "exact", "big-batch", "big-batch-checkpointed"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--data", args.data, "--steps", str(args.steps),
                              "--micro", str(args.micro), "--accum", str(args.accum)],
                             stdout=subprocess.PIPE, text=True, check=True)  # stderr shows through
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| mode | micro-batch x steps | negatives per pair | pairs/s | peak memory (GB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['micro_batch']} x {r['accumulation_steps']} | {r['negatives_per_pair']} | "
              f"{r['pairs_per_second']} | {r['peak_memory_gb']} |")
    print(f"device: {rows[0]['device']}; {rows[0]['timed_steps']} timed steps per mode after one warm-up step")


if __name__ == "__main__":
    main()
