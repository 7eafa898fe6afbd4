"""The image cache: built once, resumed, bad images skipped, read back equal to a direct decode."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import make_image_folder_dataset

from cliptune.config import DataConfig, load_config
from cliptune.data.cache import DONE_FILE, IMAGES_FILE, CacheError, ImageCache, build_cache
from cliptune.data.images import ImageError, open_rgb, resize_center_crop
from cliptune.data.readers import read_split

SIZE = 40


@pytest.fixture()
def dataset(tmp_path):
    jsonl = make_image_folder_dataset(tmp_path / "data", n_images=8)
    (tmp_path / "data" / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    records = {s: read_split(DataConfig(path=str(jsonl)), s)[0] for s in ("train", "val")}
    return jsonl, records, tmp_path / "data" / "images" / "bad.jpg"


def test_build_reads_back_equal_to_direct_decode(dataset, tmp_path):
    _, records, bad = dataset
    paths = [r.image_path for split in records.values() for r in split]
    stats = build_cache(paths + [bad], tmp_path / "cache", SIZE, workers=2, progress=False)
    assert (stats.total, stats.cached, stats.already_done) == (len(paths) + 1, len(paths) + 1, 0)
    assert [p for p, _ in stats.bad] == [str(bad)] and "bad.jpg" in stats.bad[0][1]
    cache = ImageCache.open(tmp_path / "cache")
    for path in paths:
        expected = np.asarray(resize_center_crop(open_rgb(path, 10**8, draft_size=SIZE), SIZE))
        assert np.array_equal(cache.get_array(path), expected)
        assert np.array_equal(np.asarray(cache.get_pil(path)), expected)
        assert cache.get_pil(path).size == (SIZE, SIZE) and cache.get_pil(path).mode == "RGB"
    with pytest.raises(ImageError, match="bad.jpg"):
        cache.get_pil(bad)
    with pytest.raises(ImageError, match="nowhere.jpg.*not in the image cache"):
        cache.get_pil(tmp_path / "nowhere.jpg")


def test_resume_decodes_only_unfinished_rows(dataset, tmp_path):
    _, records, _ = dataset
    out = tmp_path / "cache"
    first = build_cache(records, out, SIZE, workers=1, progress=False)
    # Pretend the build was interrupted after 3 rows: the others are zeroed and marked to do.
    done = np.load(out / DONE_FILE)
    done[3:] = 0
    np.save(out / DONE_FILE, done)
    pixels = np.memmap(out / IMAGES_FILE, dtype=np.uint8, mode="r+", shape=(first.total, SIZE, SIZE, 3))
    reference = np.array(pixels)
    pixels[3:] = 0
    pixels.flush()
    with pytest.raises(ImageError, match="not cached yet"):
        ImageCache.open(out).get_array(records["train"][-1].image_path)
    again = build_cache(records, out, SIZE, workers=2, progress=False)
    assert (again.already_done, again.cached) == (3, first.total - 3)
    assert np.array_equal(np.array(np.memmap(out / IMAGES_FILE, dtype=np.uint8, mode="r", shape=reference.shape)),
                          reference)
    assert ImageCache.open(out).complete


def test_other_images_or_size_refused(dataset, tmp_path):
    _, records, _ = dataset
    build_cache(records["train"], tmp_path / "cache", SIZE, workers=1, progress=False)
    with pytest.raises(CacheError, match="other images or another size"):
        build_cache(records["train"], tmp_path / "cache", SIZE + 8, workers=1, progress=False)
    with pytest.raises(CacheError, match="not an image cache"):
        ImageCache.open(tmp_path / "missing")


def test_picklable_for_dataloader_workers(dataset, tmp_path):
    _, records, _ = dataset
    build_cache(records, tmp_path / "cache", SIZE, workers=1, progress=False)
    cache = ImageCache.open(tmp_path / "cache")
    path = records["train"][0].image_path
    before = cache.get_array(path)  # opens the memory map in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._images is None
    assert np.array_equal(clone.get_array(path), before)


def test_trainer_reads_the_cache(dataset, tmp_path, tiny_clip_dir, monkeypatch):
    from cliptune.training.recipe import Trainer

    jsonl, records, _ = dataset
    build_cache(records, tmp_path / "cache", 36, workers=1, progress=False)
    calls = []
    original = ImageCache.get_pil
    monkeypatch.setattr(ImageCache, "get_pil", lambda self, path: calls.append(path) or original(self, path))
    config = load_config(None, {"model.name": str(tiny_clip_dir), "data.path": str(jsonl),
                                "data.cache_dir": str(tmp_path / "cache"), "data.num_workers": 0,
                                "train.max_steps": 2, "train.micro_batch_size": 2, "train.grad_accum_steps": 2,
                                "train.report": False, "train.output_dir": str(tmp_path / "run"),
                                "train.device": "cpu", "train.log_every": 1})
    trainer = Trainer(config, progress=False)
    trainer.setup()
    result = trainer.train()
    assert result.steps == 2 and not result.bad_images
    assert len(calls) == trainer.pairs_seen == 6  # 6 train images: steps of 4 + 2 pairs, every image from the cache
    assert {str(p) for p in calls} == {str(r.image_path) for r in records["train"]}


def test_cli_data_cache_caches_every_split(dataset, tmp_path, capsys):
    from cliptune.apps.cli import main

    jsonl, _, _ = dataset
    out = tmp_path / "cli-cache"
    assert main(["data", "cache", "--data.path", str(jsonl), "--data.cache_dir", str(out), "--size", "40",
                 "--data.num_workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "split 'test' skipped" in printed and "8 images at 40x40" in printed
    assert len(ImageCache.open(out)) == 8 and ImageCache.open(out).complete
