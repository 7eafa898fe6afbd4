"""`cliptune bench --short` runs and prints one JSON object with the expected keys (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch

from cliptune.apps.cli import main

EXPECTED = {"device", "input_images_per_s", "speedup_cache_read_vs_decode", "speedup_cache_transform_vs_decode",
            "train_step_model_only_pairs_per_s", "speedup_train_model_only", "fast_path_precision",
            "train_end_to_end_pairs_per_s", "speedup_train_end_to_end", "eval_encode_pairs_per_s",
            "speedup_eval_encode", "peak_memory_mb_train_step", "peak_memory_mb_end_to_end",
            "bf16_matmul_speedup_probe", "speedup_fast_lora_model_only", "bench_seconds"}


def test_bench_short_prints_json(tiny_clip_dir, coco_mini, capsys):
    assert main(["bench", "--short", "--model.name", str(tiny_clip_dir), "--train.device", "cpu",
                 "--data.path", str(coco_mini)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert EXPECTED <= set(result)
    assert set(result["train_end_to_end_pairs_per_s"]) == {"naive", "cliptune"}
    assert {"naive_fp32_pad77_return_loss", "cliptune_fp32", "cliptune_fp32_peft_lora"} <= set(result["train_step_model_only_pairs_per_s"])
    assert all(v > 0 for v in result["input_images_per_s"].values())


def test_bench_needs_its_data_named(tiny_clip_dir, capsys):
    """No folder outside the package is picked by default: an installed cliptune has no ../shared."""
    from cliptune.apps.bench import BenchOptions, run_bench
    from cliptune.config import UsageError

    assert main(["bench", "--short", "--model.name", str(tiny_clip_dir), "--train.device", "cpu"]) == 2
    assert "--data.path" in capsys.readouterr().err
    with pytest.raises(UsageError, match="bench: no data: give --data.path"):
        run_bench(BenchOptions(model=str(tiny_clip_dir), device="cpu", short=True))


TRAINER_KEYS = {"seed_loop_pairs_per_s", "trainer_default_pairs_per_s", "trainer_plain_pairs_per_s",
                "speedup_trainer_default_vs_seed_loop", "speedup_trainer_plain_vs_seed_loop", "trainer_precision",
                "cpu_model", "cpu_capability", "cpu_avx512_bf16", "cpu_amx_bf16", "cpu_threads"}


def test_bench_trainer_only_times_seed_loop_and_trainer(tiny_clip_dir, coco_mini, capsys):
    import transformers

    assert main(["bench", "--trainer-only", "--steps", "1", "--model.name", str(tiny_clip_dir), "--train.device",
                 "cpu", "--train.micro_batch_size", "2", "--data.path", str(coco_mini)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert TRAINER_KEYS <= set(result)
    assert all(result[k] > 0 for k in ("seed_loop_pairs_per_s", "trainer_default_pairs_per_s",
                                       "trainer_plain_pairs_per_s"))
    assert result["trainer_precision"] == "fp32"
    # Seen by hooks on the model and optimizer: 1 warm-up + 1 timed step, 4 micro-batches each.
    assert result["seed_loop_optimizer_steps"] == 2
    assert result["seed_loop_forwards"] == 4 * result["seed_loop_optimizer_steps"]
    context = transformers.CLIPConfig.from_pretrained(tiny_clip_dir).text_config.max_position_embeddings
    assert result["seed_loop_text_lengths"] == [context]
    assert result["trainer_bench"]["pairs_per_side"] == 1 * 2 * 4


def test_seed_loop_accumulates_per_micro_batch(tiny_clip_dir, coco_mini, monkeypatch):
    """Backward once per micro-batch on loss / accum: a loop that stepped per micro-batch, or summed the
    loss without dividing, fails here."""
    import transformers

    from cliptune.apps.bench_trainer import SeedTrace, TrainerBenchRequest, seed_loop

    backwards: list[float] = []
    losses: list[float] = []
    real_backward, real_forward = torch.Tensor.backward, transformers.CLIPModel.forward

    def backward(self, *args, **kwargs):
        backwards.append(self.item())
        return real_backward(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        losses.append(out.loss.item())
        return out

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(transformers.CLIPModel, "forward", forward)
    trace = SeedTrace()
    request = TrainerBenchRequest(str(tiny_clip_dir), str(coco_mini / "captions_{split}.json"), "cpu", steps=1,
                                  micro_batch=2, accum=4)
    assert seed_loop(request, trace) > 0
    assert trace.optimizer_steps == 2 and trace.forwards == 8 and len(losses) == 8
    assert backwards == pytest.approx([loss / 4 for loss in losses])
