"""benchmarks/scale.py: its --short run prints one JSON of the expected shape with the sanity check done,
its sanity check catches a wrong metric, and its peak-memory probe sees memory freed before it looks."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scale.py"


def load_scale():
    spec = importlib.util.spec_from_file_location("scale_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_short_run_prints_one_json_with_the_sanity_check(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, str(SCRIPT), "--short", "--out", str(tmp_path / "scale.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result == json.loads((tmp_path / "scale.json").read_text())
    assert {"cpu_model", "torch_threads", "faiss_threads", "chunk_size", "peak_memory_method", "sanity_check",
            "metric", "index", "load_average_1min", "command"} <= set(result)
    assert result["short"] and result["cpu_model"] and result["torch_threads"] >= 1

    sanity = result["sanity_check"]
    assert sanity["recalls_equal_brute_force"] is True
    (checked,) = [row for row in result["metric"] if row["images"] == sanity["images"]]
    assert checked["recalls"] == sanity["brute_force_recalls"]
    assert 0 < checked["recalls"]["text_to_image_R@1"] < 100  # the synthetic captions are neither trivial nor noise

    for row in result["metric"]:
        assert row["captions"] == 5 * row["images"]
        assert row["embeddings_bytes"] == 6 * row["images"] * 512 * 4
        assert row["seconds"] > 0 and row["cpu_seconds"] > 0 and row["peak_bytes"] > 0
    assert [row["images"] for row in result["index"]] == [200, 2_000]
    for row in result["index"]:
        assert row["index_bytes"] == row["vectors_bytes"] == row["images"] * 512 * 4
        assert row["single_query_p50_ms"] > 0 and row["batch_p50_ms"] > 0 and row["batch_cpu_p50_ms"] > 0
        assert row["single_queries"] >= 20 and row["batches"] >= 1
        assert row["batch_true_image_in_top10_pct"] > 50  # queries are captions of indexed photos


def test_parts_and_threads_are_passed_to_the_cases(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, str(SCRIPT), "--short", "--parts", "index", "--threads", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["metric"] == [] and result["sanity_check"] is None and result["torch_threads"] is None
    assert result["faiss_threads"] == 1 and all(row["faiss_threads"] == 1 for row in result["index"])


def test_sanity_check_fails_when_the_metric_is_wrong(monkeypatch):
    import cliptune.evaluation.metrics as metrics

    scale = load_scale()
    assert scale.metric_case(100, sanity=True)["sanity_check"]["recalls_equal_brute_force"]
    real = metrics.retrieval_metrics

    @functools.wraps(real)  # the benchmark reads chunk_size's default from the signature
    def one_hit_short(*args, **kwargs):
        result = real(*args, **kwargs)
        result["text_to_image_R@5"] -= 100.0 / 500  # one caption of 500 fewer
        return result

    monkeypatch.setattr(metrics, "retrieval_metrics", one_hit_short)
    with pytest.raises(AssertionError, match="sanity check: retrieval_metrics text_to_image_R@5"):
        scale.metric_case(100, sanity=True)


def test_peak_memory_counts_what_was_freed_before_the_call_returned():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    scale = load_scale()

    def touch_and_free() -> None:
        block = np.ones(80_000_000 // 8)  # 80 MB, every page written
        del block

    measured = scale.measure(touch_and_free)
    assert measured.result is None and measured.seconds > 0 and measured.cpu_seconds > 0
    # Within 5 %: the process may release other pages meanwhile.
    assert 76e6 <= measured.peak_bytes < 120e6, measured.peak_bytes
    small = scale.measure(lambda: None).peak_bytes
    assert small < 10e6, small  # the reset works: the 80 MB of the previous call are not counted again
