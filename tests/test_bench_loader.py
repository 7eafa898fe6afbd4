"""`cliptune bench --loader-only`: one JSON object, positive rates, and the workers-for-10k arithmetic."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from cliptune.apps.bench_loader import workers_for
from cliptune.apps.cli import main

PATHS = {"jpeg_cpu_augment", "jpeg_exact", "cache_input_size", "cache_cpu_augment", "cache_device_augment"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from conftest import make_image_folder_dataset

    return make_image_folder_dataset(tmp_path_factory.mktemp("loader-bench"), n_images=16)


def test_loader_only_prints_rates_per_worker_and_workers_for_10k(tiny_clip_dir, tiny_data, capsys):
    assert main(["bench", "--loader-only", "--short", "--model.name", str(tiny_clip_dir), "--train.device", "cpu",
                 "--train.micro_batch_size", "4", "--data.path", str(tiny_data)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["loader_pairs_per_s"]) == PATHS
    for rates in result["loader_pairs_per_s"].values():
        assert set(rates) == {"workers_0", "workers_1"} and all(rate > 0 for rate in rates.values())
    per_worker = result["pairs_per_s_per_worker"]
    assert per_worker == {name: rates["workers_1"] for name, rates in result["loader_pairs_per_s"].items()}
    assert result["workers_for_10k_pairs_per_s"] == {name: math.ceil(10_000 / rate) for name, rate in per_worker.items()}
    assert result["device_augment_pairs_per_s"] > 0 and result["tokenize_captions_per_s"] > 0
    assert all(rate > 0 for rate in result["cache_device_augment_end_to_end_pairs_per_s"].values())
    assert result["image_size"] == 32 and result["source_size"] == 36 and result["micro_batch"] == 4
    assert result["images"] == 12 and result["device"] == "cpu" and result["short"] is True
    assert {"cpu_model", "cpu_capability", "cpu_avx512_bf16", "cpu_threads", "note"} <= set(result)
    assert result["augment"]["random_resized_crop"] and result["augment"]["color_jitter"] > 0


def test_workers_for_rounds_up():
    assert workers_for(10_000) == 1
    assert workers_for(9_999.9) == 2
    assert workers_for(684.2) == 15  # 10000 / 684.2 = 14.6
    assert workers_for(100, target=250) == 3


@pytest.mark.parametrize("extra, message", [
    (["--trainer-only"], "--trainer-only, --sweep and --steps do not apply"),
    (["--steps", "3"], "--trainer-only, --sweep and --steps do not apply"),
    (["--data.cache_dir", "x", "--cache-size", "64"], "give --data.cache_dir or --cache-size, not both"),
])
def test_loader_only_refuses_flags_it_does_not_use(tiny_data, extra, message, capsys):
    assert main(["bench", "--loader-only", "--data.path", str(tiny_data), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cache_dir_only_with_loader_only(tiny_data, capsys):
    assert main(["bench", "--data.path", str(tiny_data), "--data.cache_dir", "x"]) == 2
    assert "--data.cache_dir is read with --loader-only only" in capsys.readouterr().err


def test_a_batch_larger_than_the_data_is_refused(tiny_clip_dir, tiny_data, capsys):
    assert main(["bench", "--loader-only", "--model.name", str(tiny_clip_dir), "--train.micro_batch_size", "64",
                 "--data.path", str(tiny_data)]) == 2
    assert "--train.micro_batch_size 64 is more than the 12 training images" in capsys.readouterr().err


# -- what makes a cached read cheap: the loader's batches stay the same ---------------------------------


def _reference_padding(sequences, pad_id, length=None):
    width = length or max(len(s) for s in sequences)
    ids = [s + [pad_id] * (width - len(s)) for s in sequences]
    mask = [[1] * len(s) + [0] * (width - len(s)) for s in sequences]
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("length", [None, 12])
def test_pad_token_batch_equals_row_by_row_padding(length):
    from cliptune.data.batches import pad_token_batch

    rng = random.Random(0)
    sequences = [[rng.randrange(1, 500) for _ in range(rng.randint(1, 12))] for _ in range(40)]
    batch = pad_token_batch(sequences, 0, length)
    ids, mask = _reference_padding(sequences, 0, length)
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    with pytest.raises(ValueError, match="13 tokens does not fit the padded length 12"):
        pad_token_batch([[1] * 13], 0, 12)


def test_cache_rows_are_stacked_without_reordering_their_channels():
    """Rows read from the cache are (3, S, S) views of (S, S, 3) memory; their batch is the same pixels,
    channels-last in memory (no per-image de-interleave), and images made channels-first stack as before."""
    from cliptune.data.batches import stack_pixels

    rows = [torch.randint(0, 256, (9, 9, 3), dtype=torch.uint8) for _ in range(5)]
    views = [row.permute(2, 0, 1) for row in rows]
    batch = stack_pixels(views)
    expected = torch.stack([view.contiguous() for view in views])
    assert batch.shape == (5, 3, 9, 9) and torch.equal(batch, expected)
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
    plain = stack_pixels([view.contiguous() for view in views])
    assert plain.is_contiguous() and torch.equal(plain, expected)


def test_a_cached_batch_is_the_decoded_one(tiny_clip_dir, tiny_data, tmp_path):
    """The exact cache path (channels-last rows) gives the pixels the JPEG decode gives, through the collator."""
    from cliptune.config import DataConfig, ModelConfig
    from cliptune.data.batches import PairCollator, PairDataset, tokenize_captions
    from cliptune.data.cache import ImageCache, build_cache
    from cliptune.data.readers import read_split
    from cliptune.models.contrastive import load_preprocessing

    records, _ = read_split(DataConfig(path=str(tiny_data)), "train")
    preprocessing = load_preprocessing(ModelConfig(name=str(tiny_clip_dir)))
    build_cache(records, tmp_path / "cache", preprocessing.image_size, workers=1, progress=False,
                rule=preprocessing.resize_rule)
    cache = ImageCache.open(tmp_path / "cache")
    tokens = tokenize_captions(records, preprocessing)
    keys = [(0, i, 0) for i in range(len(records))]
    batches = []
    for source in (None, cache):
        dataset = PairDataset(records, tokens, preprocessing.image_transform(), 0, 10**8, image_source=source)
        batches.append(PairCollator(tokens)([dataset[key] for key in keys]))
    assert batches[1]["pixels"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batches[0]["pixels"], batches[1]["pixels"])
    assert torch.equal(preprocessing.normalize(batches[0]["pixels"]), preprocessing.normalize(batches[1]["pixels"]))
