"""The training data object without a Trainer: the plan from annotations (or shard headers), the checked
split, and `steps` / `loader(epoch, start_step)`, which resume mid-epoch with the same batches."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from conftest import make_image_folder_dataset

from cliptune.config import DataConfig, load_config
from cliptune.data.readers import read_split
from cliptune.models.contrastive import load_model
from cliptune.training.data import TrainingData


def config_for(data_path, out, **overrides):
    settings = {"data.path": str(data_path), "train.output_dir": str(out), "train.device": "cpu",
                "data.num_workers": 0, "train.micro_batch_size": 2, "train.grad_accum_steps": 2,
                "train.epochs": 2, "train.report": False}
    settings.update(overrides)
    return load_config(None, settings)


@pytest.fixture(scope="module")
def preprocessing(tiny_clip_dir):
    return load_model(load_config(None, {"model.name": str(tiny_clip_dir)}).model)[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """14 images, 3 captions each: 11 train (i % 4 != 3), 3 val."""
    return make_image_folder_dataset(tmp_path_factory.mktemp("files") / "data", n_images=14)


@pytest.fixture(scope="module")
def shards(files, tmp_path_factory):
    """The same images packed as WebDataset shards, 4 train and 2 val; the `{split}` pattern."""
    from cliptune.data.shards import write_webdataset

    root = tmp_path_factory.mktemp("shards")
    for split, size in (("train", 3), ("val", 2)):
        write_webdataset(read_split(DataConfig(path=str(files)), split)[0], str(root / f"{split}-%06d.tar"),
                         shard_size=size, split=split)
    return str(root / "{split}-{000000..000003}.tar")


# 11 train images (33 captions), micro-batch 2 x 2 accumulation steps = 4 pairs a step per process.
# A partial last step is kept when each process still gets a pair: 11 = 2 x 4 + 3 -> 3 steps.
@pytest.mark.parametrize("overrides, world, expected", [
    ({}, 1, (11, 3, 6, 2)),
    ({"data.captions": "all"}, 1, (33, 9, 18, 2)),  # 33 = 8 x 4 + 1
    ({}, 2, (11, 2, 4, 2)),  # 8 pairs a step: 11 = 8 + 3, and 3 >= 2 processes
    ({"data.captions": "all"}, 2, (33, 4, 8, 2)),  # 33 = 4 x 8 + 1, and 1 < 2 processes: dropped
    ({"train.max_steps": 4}, 1, (11, 3, 4, 2)),  # 4 steps reach into the second epoch
    ({"train.max_steps": 2}, 1, (11, 3, 2, 1)),
])
def test_read_plans_from_the_annotations(files, tmp_path, overrides, world, expected):
    plan = TrainingData.read(config_for(files, tmp_path, **overrides), world).plan
    assert (plan.pairs_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.epochs) == expected
    assert plan.train_images == 11 and plan.effective_batch == 4 * world and plan.world_size == world


def test_read_opens_no_image_and_load_leaves_unreadable_ones_out(files, preprocessing, tmp_path):
    data_dir = tmp_path / "copy"
    copied = make_image_folder_dataset(data_dir, n_images=14)
    (data_dir / "images" / "005.png").write_bytes(b"not a png")
    config = config_for(copied, tmp_path / "run")
    assert TrainingData.read(config).plan.train_images == 11  # the annotations' count: nothing opened
    data = TrainingData.load(config, preprocessing, Accelerator())
    assert data.plan.train_images == 10
    assert [path for path, _ in data.bad_images] == [str(data_dir / "images" / "005.png")]
    assert "005.png" not in {r.image_path.name for r in data.records}


def test_shards_plan_from_their_headers_and_the_val_split_is_extracted(shards, preprocessing, tmp_path):
    config = config_for(shards, tmp_path / "run", **{"train.report": True})
    assert TrainingData.read(config).plan.train_images == 11
    data = TrainingData.load(config, preprocessing, Accelerator())
    assert data.plan.train_images == 11 and data.records == [] and data.captions is None
    assert len(data.val_records) == 3
    assert (tmp_path / "run" / "val-from-shards" / "captions.jsonl").is_file()


def _flat(steps) -> list[dict]:
    return [batch for step in steps for batch in step]


def _same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in ("pixels", "input_ids", "attention_mask", "image_ids"):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("source", ["files", "shards"])
def test_a_resumed_epoch_sees_the_batches_an_uninterrupted_one_would(source, files, shards, preprocessing,
                                                                      tmp_path):
    config = config_for(files if source == "files" else shards, tmp_path / "run", **{
        "data.augment.random_resized_crop": True, "data.augment.color_jitter": 0.3, "data.captions": "all"})
    data = TrainingData.load(config, preprocessing, Accelerator())
    epoch = list(data.steps(1, 0))
    assert len(epoch) == data.plan.steps_per_epoch
    resumed = list(data.steps(1, 2))
    assert len(resumed) == len(epoch) - 2
    for got, expected in zip(resumed, epoch[2:]):
        _same_batches(got, expected)
    _same_batches(list(data.loader(1, 2)), _flat(epoch[2:]))
    other_epoch = _flat(data.steps(0, 0))
    assert not all(torch.equal(a["image_ids"], b["image_ids"]) for a, b in zip(other_epoch, _flat(epoch)))


def test_every_training_pair_comes_once_an_epoch_in_steps_of_the_plan(files, preprocessing, tmp_path):
    config = config_for(files, tmp_path / "run", **{"data.captions": "all"})
    data = TrainingData.load(config, preprocessing, Accelerator())
    steps = list(data.steps(0, 0))
    images = [int(i) for step in steps for batch in step for i in batch["image_ids"]]
    sizes = [sum(len(batch["image_ids"]) for batch in step) for step in steps]
    # 33 pairs = 8 full steps of 4 + a last step of 1 (two micro-batches, then one).
    assert sizes == [4] * 8 + [1] and [len(step) for step in steps] == [2] * 8 + [1]
    assert sorted(images) == sorted(list(range(11)) * 3)  # each image with each of its 3 captions
