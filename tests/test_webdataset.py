"""WebDataset shards: records -> shards -> the same pairs back; corrupt samples skipped and counted."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from conftest import make_image_folder_dataset

from cliptune.config import DataConfig
from cliptune.data.images import open_rgb
from cliptune.data.readers import read_split
from cliptune.data.shards import ShardStats, iter_webdataset, materialize_webdataset, write_webdataset


def _records(tmp_path):
    jsonl = make_image_folder_dataset(tmp_path / "data", n_images=7)
    return read_split(DataConfig(path=str(jsonl)), "train")[0]


def test_round_trip(tmp_path):
    records = _records(tmp_path)
    shards = write_webdataset(records, str(tmp_path / "shards" / "train-%06d.tar"), shard_size=2)
    assert [s.name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    stats = ShardStats()
    samples = list(iter_webdataset(str(tmp_path / "shards" / "train-{000000..000002}.tar"), stats=stats))
    assert stats.samples == len(records) and not stats.skipped
    for record, (key, image, captions) in zip(records, samples, strict=True):
        assert key.endswith(record.image_id.replace(".", "_").replace("/", "_"))
        assert captions == list(record.captions)
        assert np.array_equal(np.asarray(image), np.asarray(open_rgb(record.image_path, 10**8)))


def test_materialize_gives_the_jsonl_data_reads(tmp_path):
    records = _records(tmp_path)
    write_webdataset(records, str(tmp_path / "shards" / "train-%06d.tar"), shard_size=3, split="train")
    jsonl = materialize_webdataset(str(tmp_path / "shards" / "train-{000000..000002}.tar"), tmp_path / "out")
    back = read_split(DataConfig(path=str(jsonl)), "train")[0]
    assert [r.captions for r in back] == [r.captions for r in records]
    for a, b in zip(back, records, strict=True):
        assert a.image_path.read_bytes() == b.image_path.read_bytes()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_sample_skipped_and_counted(tmp_path):
    records = _records(tmp_path)
    good = records[0].image_path.read_bytes()
    with tarfile.open(tmp_path / "mixed-000000.tar", "w") as tar:
        _add(tar, "a.png", good)
        _add(tar, "a.txt", b"first caption\n\nsecond caption\n")
        _add(tar, "b.jpg", b"\xff\xd8\xff\xe0 garbage, not a jpeg")
        _add(tar, "b.txt", b"never seen")
        _add(tar, "c.png", good)
        _add(tar, "c.json", json.dumps({"caption": "from json"}).encode())
        _add(tar, "d.png", good)  # no captions at all
    stats = ShardStats()
    samples = list(iter_webdataset(str(tmp_path / "mixed-000000.tar"), stats=stats))
    assert [(k, c) for k, _, c in samples] == [("a", ["first caption", "second caption"]), ("c", ["from json"])]
    assert stats.samples == 2 and len(stats.skipped) == 2
    assert "b" in stats.skipped[0][0] and "unreadable image" in stats.skipped[0][1]
