"""`cliptune bench --short` runs and prints one JSON object with the expected keys (no timing asserts)."""

from __future__ import annotations

import json

import pytest

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
