"""Photo search: index/search round trip, resume, unreadable files, approximate indexes, ONNX without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliptune.data.images import open_rgb
from cliptune.deploy.embedders import OnnxEmbedder, TorchEmbedder
from cliptune.deploy.index import Index

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (128, 0, 128), "orange": (255, 140, 0),
           "cyan": (0, 220, 220), "pink": (255, 105, 180)}


class ColourEmbedder:
    """A transparent stand-in model: an image is its mean colour, a caption the colour it names."""

    spec = {"kind": "test-colour"}
    dim = 3
    image_size = 16

    def __init__(self):
        self.images_embedded = 0

    def embed_images(self, images):
        self.images_embedded += len(images)
        images = [im if isinstance(im, Image.Image) else open_rgb(im) for im in images]
        return _unit(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images]))

    def embed_texts(self, texts):
        return _unit(np.stack([np.asarray(next(c for n, c in COLOURS.items() if n in t), np.float32) for t in texts]))


def _unit(x):
    x = x.astype(np.float32) - 127.0  # centred: black and white point opposite ways
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_photos(root: Path) -> Path:
    """One photo per colour, in nested folders and mixed formats."""
    for i, (name, rgb) in enumerate(COLOURS.items()):
        folder = root / ("sub" if i % 2 else "") / ("deeper" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), rgb).save(folder / f"{name}.{['png', 'jpg', 'webp', 'bmp'][i % 4]}")
    (root / "notes.txt").write_text("not a photo")
    return root


@pytest.fixture()
def photos(tmp_path) -> Path:
    return make_photos(tmp_path / "photos")


def test_colour_query_finds_its_photo(photos, tmp_path):
    index = Index.build(photos, tmp_path / "index", ColourEmbedder(), shard_size=3, progress=False)
    assert len(index.paths) == len(COLOURS) and not index.meta["skipped"]
    for name in COLOURS:
        best, score = index.search(f"a {name} picture", k=3)[0]
        assert Path(best).stem == name and score > 0.99
    loaded = Index.load(tmp_path / "index", embedder=ColourEmbedder())
    assert loaded.search("something blue", k=1)[0][0] == index.search("something blue", k=1)[0][0]
    image_query = next(photos.rglob("orange.*"))
    assert Path(loaded.search(image_query, k=1)[0][0]).stem == "orange"


def test_unreadable_files_are_skipped_and_counted(photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"this is not a jpeg")
    (photos / "empty.png").write_bytes(b"")
    index = Index.build(photos, tmp_path / "index", ColourEmbedder(), shard_size=4, progress=False)
    assert len(index.paths) == len(COLOURS)
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert sorted(item["path"] for item in meta["skipped"]) == ["broken.jpg", "empty.png"]
    assert all(item["reason"] for item in meta["skipped"])


def test_resume_reuses_finished_shards(photos, tmp_path):
    first = ColourEmbedder()
    with pytest.raises(InterruptedError):
        Index.build(photos, tmp_path / "index", first, shard_size=4, progress=False, max_shards=2)
    assert first.images_embedded == 8
    second = ColourEmbedder()
    resumed = Index.build(photos, tmp_path / "index", second, shard_size=4, progress=False)
    assert second.images_embedded == 2  # only the last shard
    fresh = Index.build(photos, tmp_path / "fresh", ColourEmbedder(), shard_size=4, progress=False)
    assert resumed.paths == fresh.paths
    assert np.array_equal(np.load(tmp_path / "index" / "embeddings.npy"),
                          np.load(tmp_path / "fresh" / "embeddings.npy"))
    assert resumed.update.resumed == 8 and resumed.update.added == 10
    assert not (tmp_path / "index" / "parts").exists()  # a finished build leaves no parts behind


def test_resume_after_the_folder_changed_keeps_the_finished_shards(photos, tmp_path):
    # Parts are keyed by each photo's path, size and mtime_ns, not by the file list: a photo added
    # while a build was interrupted costs one embedding, not the whole folder again.
    with pytest.raises(InterruptedError):
        Index.build(photos, tmp_path / "index", ColourEmbedder(), shard_size=4, progress=False, max_shards=2)
    Image.new("RGB", (30, 30), (1, 2, 3)).save(photos / "aaa-new.png")
    second = ColourEmbedder()
    resumed = Index.build(photos, tmp_path / "index", second, shard_size=4, progress=False)
    fresh = Index.build(photos, tmp_path / "fresh", ColourEmbedder(), shard_size=4, progress=False)
    assert resumed.paths == fresh.paths and len(resumed.paths) == len(COLOURS) + 1
    assert second.images_embedded == 3  # the new photo and the 2 the interrupted build had not reached


@pytest.mark.parametrize("approximate", ["hnsw", "ivf"])
def test_approximate_indexes_agree_on_top1(photos, tmp_path, approximate):
    index = Index.build(photos, tmp_path / approximate, ColourEmbedder(), approximate=approximate, progress=False)
    loaded = Index.load(tmp_path / approximate, embedder=ColourEmbedder())
    for name in COLOURS:
        assert Path(loaded.search(name, k=1)[0][0]).stem == name
    assert index.meta["approximate"] == approximate


@pytest.fixture(scope="module")
def onnx_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    from cliptune.deploy.export import export_model

    return export_model(str(tiny_clip_dir), tmp_path_factory.mktemp("export"), onnx=True).out_dir / "onnx"


def test_torch_and_onnx_indexes_agree(photos, tmp_path, tiny_clip_dir, onnx_dir):
    torch_index = Index.build(photos, tmp_path / "t", TorchEmbedder(str(tiny_clip_dir)), progress=False)
    onnx_index = Index.build(photos, tmp_path / "o", OnnxEmbedder(onnx_dir), progress=False)
    assert torch_index.meta["embedder"]["kind"] == "torch" and onnx_index.meta["embedder"]["kind"] == "onnx"
    query = next(photos.rglob("green.*"))
    assert Path(Index.load(tmp_path / "o").search(query, k=1)[0][0]).stem == "green"  # embedder from meta.json
    a, b = Index.load(tmp_path / "t").search("a dog", k=10), Index.load(tmp_path / "o").search("a dog", k=10)
    assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-4)


def test_onnx_search_never_imports_torch(photos, tmp_path, onnx_dir):
    Index.build(photos, tmp_path / "index", OnnxEmbedder(onnx_dir), progress=False)
    script = (
        "import sys\n"
        "from cliptune.deploy.index import Index\n"
        f"hits = Index.load({str(tmp_path / 'index')!r}).search('a red photo', k=3)\n"
        "assert len(hits) == 3, hits\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_index_and_search_cli(photos, tmp_path, onnx_dir, capsys):
    from cliptune.apps.cli import main

    assert main(["index", str(photos), "--out", str(tmp_path / "index"), "--onnx", str(onnx_dir)]) == 0
    assert "indexed 10 photos" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "index"), str(next(photos.rglob("pink.*"))), "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "pink" in lines[0]
    assert main(["index", str(photos), "--out", str(tmp_path / "i2")]) == 2  # neither --model nor --onnx


def test_coco_mini_caption_finds_its_photo(coco_mini, coco_mini_finetuned, tmp_path):
    """The issue's "done when": a model fine-tuned on coco-mini, its val photos indexed, searched by caption."""
    from cliptune.config import DataConfig
    from cliptune.data.readers import read_split

    base, result = coco_mini_finetuned
    records, _ = read_split(DataConfig(path=str(coco_mini / "captions_{split}.json")), "val")
    photos = tmp_path / "val-photos"
    photos.mkdir()
    for record in records:
        (photos / record.image_path.name).symlink_to(record.image_path)
    index = Index.build(photos, tmp_path / "index", TorchEmbedder(str(base), result.adapter_dir), progress=False)
    hits = 0
    for record in records[:20]:
        top = [Path(p).name for p, _ in index.search(record.captions[0], k=5)]
        hits += record.image_path.name in top
    start = time.perf_counter()
    index.search(records[0].captions[0], k=5)
    print(f"coco-mini val: {hits}/20 captions find their photo in the top 5; "
          f"one search {1000 * (time.perf_counter() - start):.1f} ms over {len(index.paths)} photos")
    # The index answers what a brute-force scan of the same embeddings does: the 5 best photos, best
    # first, with their cosines.
    query = records[0].captions[0]
    scores = index.embedder.embed_images([photos / p for p in index.paths]) @ index.embedder.embed_texts([query])[0]
    best = np.argsort(-scores)[:5]
    found = index.search(query, k=5)
    assert [Path(p).name for p, _ in found] == [Path(index.paths[i]).name for i in best]
    assert [score for _, score in found] == pytest.approx(scores[best].tolist(), abs=1e-5)
    assert hits >= 10  # measured 13/20 on the build machine (print above, with -s)
