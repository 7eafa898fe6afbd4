"""Training streamed from WebDataset shards: counts, determinism (workers, resume, ranks), the trainer."""

from __future__ import annotations

import io
import random
import tarfile

import pytest
import torch
from conftest import make_image_folder_dataset
from torch.utils.data import DataLoader

from cliptune.config import DataConfig, load_config
from cliptune.data.images import ImageTransform
from cliptune.data.readers import read_split
from cliptune.data.shards import write_webdataset
from cliptune.data.streaming import (
    ShardPairStream,
    count_shards,
    expand_shards,
    sample_image_id,
    shuffle_buffer,
)
from cliptune.models.contrastive import load_model


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory):
    """28 images, 3 captions each: 21 train in 4 shards (6, 6, 6, 3), 7 val in 4 shards. Returns the
    `{split}` pattern."""
    root = tmp_path_factory.mktemp("shards")
    jsonl = make_image_folder_dataset(root / "data", n_images=28)
    for split, size in (("train", 6), ("val", 2)):
        records = read_split(DataConfig(path=str(jsonl)), split)[0]
        write_webdataset(records, str(root / "shards" / f"{split}-%06d.tar"), shard_size=size, split=split)
    return str(root / "shards" / "{split}-{000000..000003}.tar")


@pytest.fixture(scope="module")
def preprocessing(tiny_clip_dir):
    return load_model(load_config(None, {"model.name": str(tiny_clip_dir)}).model)[1]


def _stream(shards, preprocessing, **overrides) -> ShardPairStream:
    options = dict(seed=0, epoch=0, start_step=0, steps=4, micro_batch=3, accum=2, rank=0, world_size=1,
                   captions="sample", buffer=5)
    options.update(overrides)
    return ShardPairStream(shards, preprocessing, ImageTransform(preprocessing.image_size), **options)


def _batches(stream, workers=0) -> list[dict]:
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in ("pixels", "input_ids", "image_ids")) for x, y in zip(a, b))


def test_count_shards_counts_samples_captions_and_what_the_stream_skips(shard_data, tmp_path):
    shards = expand_shards(shard_data.replace("{split}", "train"))
    assert len(shards) == 4
    count = count_shards(shards)
    assert (count.samples, count.captions, count.skipped) == (21, 63, [])
    image = open(shards[0], "rb").read()  # any bytes; only the members' names and captions are read
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        for name, data in (("a.png", image), ("a.txt", b"one\n\ntwo\n"), ("b.png", image), ("b.txt", b"  \n"),
                           ("c.txt", b"a caption without an image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    odd = count_shards([str(tmp_path / "odd.tar")])
    assert (odd.samples, odd.captions) == (1, 2)
    assert sorted(why.split(" ")[0] for _, why in odd.skipped) == ["no", "no"] and len(odd.skipped) == 2


def test_shuffle_buffer_is_a_permutation_and_seeded():
    out = list(shuffle_buffer(iter(range(50)), 8, random.Random(1)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == list(shuffle_buffer(iter(range(50)), 8, random.Random(1)))


def test_batches_do_not_depend_on_the_number_of_workers(shard_data, preprocessing):
    shards = expand_shards(shard_data.replace("{split}", "train"))
    alone = _batches(_stream(shards, preprocessing))
    assert len(alone) == 8 and all(len(b["image_ids"]) == 3 for b in alone)
    assert _same(alone, _batches(_stream(shards, preprocessing), workers=2))


def test_resuming_at_a_step_gives_the_rest_of_the_epoch(shard_data, preprocessing):
    shards = expand_shards(shard_data.replace("{split}", "train"))
    full = _batches(_stream(shards, preprocessing))
    assert _same(full[2 * 3:], _batches(_stream(shards, preprocessing, start_step=3)))


def test_an_epoch_sees_every_sample_once_and_epochs_differ(shard_data, preprocessing):
    shards = expand_shards(shard_data.replace("{split}", "train"))
    # 21 samples, micro 7 x accum 3 = one step of 21 pairs: the whole epoch.
    epochs = [_batches(_stream(shards, preprocessing, steps=1, micro_batch=7, accum=3, epoch=e)) for e in (0, 1)]
    ids = [torch.cat([b["image_ids"] for b in batches]).tolist() for batches in epochs]
    assert len(set(ids[0])) == 21 and sorted(ids[0]) == sorted(ids[1]) and ids[0] != ids[1]


def test_all_captions_mode_gives_each_caption_and_shared_image_ids(shard_data, preprocessing):
    shards = expand_shards(shard_data.replace("{split}", "train"))
    batches = _batches(_stream(shards, preprocessing, captions="all", steps=7, micro_batch=9, accum=1, buffer=70))
    ids = torch.cat([b["image_ids"] for b in batches]).tolist()
    assert len(ids) == 63 and len(set(ids)) == 21 and all(ids.count(i) == 3 for i in set(ids))


def test_ranks_read_disjoint_shards_and_make_the_same_number_of_steps(shard_data, preprocessing):
    shards = expand_shards(shard_data.replace("{split}", "train"))
    per_rank = [_batches(_stream(shards, preprocessing, rank=r, world_size=3, steps=4, micro_batch=2, accum=1))
                for r in range(3)]
    # Rank 0 has shards 0 and 3 (9 samples), ranks 1 and 2 one shard of 6: they start a second pass.
    assert [len(b) for b in per_rank] == [4, 4, 4]
    seen = [set(torch.cat([b["image_ids"] for b in batches]).tolist()) for batches in per_rank]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    own = {sample_image_id(s, k) for s in shards[2::3] for k in _keys(s)}
    assert seen[2] <= own


def _keys(shard: str) -> list[str]:
    with tarfile.open(shard) as tar:
        return sorted({m.name.split(".")[0] for m in tar})


def test_a_corrupt_image_is_reported_in_the_batch_not_raised(preprocessing, tmp_path):
    good = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(good, format="PNG")
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in (("a.png", good.getvalue()), ("a.txt", b"red"), ("b.jpg", b"\xff\xd8 not a jpeg"),
                           ("b.txt", b"broken")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (batch,) = _batches(_stream([str(tmp_path / "bad.tar")], preprocessing, steps=1, micro_batch=2, accum=1))
    assert len(batch["image_ids"]) == 1
    assert len(batch["errors"]) == 1 and "bad.tar:b" in batch["errors"][0][0]


def test_trainer_streams_shards_and_evaluates_the_extracted_val_split(shard_data, tiny_clip_dir, tmp_path):
    from cliptune.training.recipe import Trainer

    config = load_config(None, {
        "model.name": str(tiny_clip_dir), "data.path": shard_data, "train.output_dir": str(tmp_path / "run"),
        "train.device": "cpu", "train.micro_batch_size": 4, "train.grad_accum_steps": 2, "train.epochs": 2,
        "data.num_workers": 0, "lora.r": 2, "train.lr": 1e-3, "train.log_every": 1})
    trainer = Trainer(config, progress=False)
    trainer.setup_model()
    plan = trainer.setup_data()
    # 21 pairs an epoch at 8 a step: 2 full steps and a partial one, kept (the stream fills it).
    assert (plan.train_images, plan.pairs_per_epoch, plan.steps_per_epoch, plan.total_steps) == (21, 21, 3, 6)
    assert len(trainer.data.val_records) == 7
    trainer.setup()
    result = trainer.train()
    assert result.steps == 6 and not result.interrupted
    assert set(result.results) == {"zero-shot", "fine-tuned"}
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "val-from-shards" / "captions.jsonl").is_file()
    assert (tmp_path / "run" / "report.md").is_file()


def test_shards_and_an_image_cache_are_refused_together(shard_data):
    from cliptune.config import ConfigError

    with pytest.raises(ConfigError, match="data.cache_dir"):
        load_config(None, {"data.path": shard_data, "data.cache_dir": "cache"})


def test_missing_shards_are_named(shard_data, tiny_clip_dir, tmp_path):
    from cliptune.training.recipe import Trainer, TrainingError

    pattern = shard_data.replace("{000000..000003}", "{000000..000005}")  # 000004 and 000005 don't exist
    config = load_config(None, {"model.name": str(tiny_clip_dir), "data.path": pattern, "train.device": "cpu",
                                "train.output_dir": str(tmp_path / "run")})
    trainer = Trainer(config, progress=False)
    trainer.setup_model()
    with pytest.raises(TrainingError, match=r"2 of 6 shards .*train-000004\.tar"):
        trainer.setup_data()


def test_cli_pack_then_train_streams_with_a_val_split_of_fewer_shards(tiny_clip_dir, tmp_path, capsys):
    from cliptune.apps.cli import main

    jsonl = make_image_folder_dataset(tmp_path / "data", n_images=16)  # 12 train, 4 val
    assert main(["data", "pack", "--data.path", str(jsonl), "--out", str(tmp_path / "shards"), "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "train: 12 images in 4 shards" in printed and "val: 4 images in 2 shards" in printed
    pattern = str(tmp_path / "shards" / "{split}-{000000..000003}.tar")
    assert pattern in printed
    assert main(["train", "--model.name", str(tiny_clip_dir), "--data.path", pattern, "--train.device", "cpu",
                 "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "2", "--lora.r", "2",
                 "--data.num_workers", "1", "--train.micro_batch_size", "3", "--train.grad_accum_steps", "2"]) == 0
    from cliptune.data.readers import read_split

    val = read_split(DataConfig(path=str(tmp_path / "run" / "val-from-shards" / "captions.jsonl")), "val")[0]
    assert len(val) == 4
    assert main(["data", "unpack", str(tmp_path / "shards" / "train-{000000..000003}.tar"),
                 "--out", str(tmp_path / "unpacked")]) == 0
    assert len(read_split(DataConfig(path=str(tmp_path / "unpacked" / "captions.jsonl")), "train")[0]) == 12
