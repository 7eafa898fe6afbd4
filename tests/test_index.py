"""An index that stays current (new photos added, deleted ones dropped, changed ones embedded again, the
rest re-used), built by several processes, and its approximate FAISS indexes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from test_search import COLOURS, ColourEmbedder, make_photos

from cliptune.apps.cli import main
from cliptune.deploy.catalog import PhotoFile, compare_rows, list_photo_files
from cliptune.deploy.embedders import TorchEmbedder
from cliptune.deploy.index import Index, build_index
from cliptune.deploy.vector_index import AnnSettings, build_faiss_index, ivf_lists, training_sample

REPO = Path(__file__).resolve().parents[1]


class Recorder:
    """Wraps an embedder and records the size of every image it embeds: make_photos gives each photo
    its own width (40 + i), so the sizes say which photos were embedded."""

    def __init__(self, embedder):
        self.embedder, self.sizes = embedder, []
        self.spec, self.dim, self.image_size = embedder.spec, embedder.dim, embedder.image_size

    def embed_images(self, images):
        self.sizes += [im.size for im in images]
        return self.embedder.embed_images(images)

    def embed_texts(self, texts):
        return self.embedder.embed_texts(texts)


def embeddings(index: Path) -> np.ndarray:
    return np.load(index / "embeddings.npy")


def size_of(photos: Path, name: str) -> tuple[int, int]:
    with Image.open(next(photos.rglob(f"{name}.*"))) as im:
        return im.size


def later(path: Path, seconds: int = 1) -> None:
    """Move the file's mtime on by whole seconds: a rewrite within the clock's tick would keep it."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def change_folder(photos: Path) -> dict[str, tuple[int, int]]:
    """One photo added, one deleted, one rewritten (new colour), one only touched; their sizes."""
    sizes = {name: size_of(photos, name) for name in ("green", "blue")}
    Image.new("RGB", (30, 30), (90, 60, 30)).save(photos / "aaa-new.png")
    next(photos.rglob("red.*")).unlink()
    green = next(photos.rglob("green.*"))
    Image.new("RGB", sizes["green"], (0, 90, 0)).save(green)
    later(green)
    later(next(photos.rglob("blue.*")))
    return {"new": (30, 30), **sizes}


# -- the row table ---------------------------------------------------------------------------------------

def test_compare_rows_counts_added_dropped_changed_kept():
    previous = {"a.jpg": (10, 1), "b.jpg": (20, 2), "c.jpg": (30, 3)}
    rows = [PhotoFile("a.jpg", 10, 1), PhotoFile("b.jpg", 20, 5), PhotoFile("d.jpg", 40, 4)]
    assert compare_rows(previous, rows) == (1, 1, 1, 1)  # d added, c dropped, b changed (mtime), a kept
    assert compare_rows({}, rows) == (3, 0, 0, 0)
    assert compare_rows(previous, [PhotoFile("a.jpg", 11, 1)]) == (0, 2, 1, 0)  # the size alone counts too


def test_list_photo_files_reads_size_and_mtime(photos):
    files = list_photo_files(photos)
    assert [f.path for f in files] == sorted((f.path for f in files), key=Path)
    red = next(f for f in files if Path(f.path).stem == "red")
    stat = (photos / red.path).stat()
    assert (red.size, red.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


@pytest.fixture()
def photos(tmp_path) -> Path:
    return make_photos(tmp_path / "photos")


# -- incremental builds ----------------------------------------------------------------------------------

def test_rebuild_embeds_only_new_and_changed_photos(photos, tmp_path):
    first = Recorder(ColourEmbedder())
    built = Index.build(photos, tmp_path / "index", first, shard_size=3, progress=False)
    assert len(first.sizes) == len(COLOURS) and built.update.added == len(COLOURS)

    changed = change_folder(photos)
    second = Recorder(ColourEmbedder())
    updated = Index.build(photos, tmp_path / "index", second, shard_size=3, progress=False)
    assert sorted(second.sizes) == sorted(changed.values())  # the 7 unchanged photos were not embedded again
    u = updated.update
    assert (u.added, u.dropped, u.changed, u.kept, u.resumed) == (1, 1, 2, 7, 0)
    assert u.describe() == "10 photos: 1 added, 1 dropped, 2 changed, 7 kept (re-used)"

    fresh = Index.build(photos, tmp_path / "fresh", ColourEmbedder(), shard_size=3, progress=False)
    assert updated.paths == fresh.paths and "aaa-new.png" in updated.paths
    assert not any(Path(p).stem == "red" for p in updated.paths)
    assert np.array_equal(embeddings(tmp_path / "index"), embeddings(tmp_path / "fresh"))
    reloaded = Index.load(tmp_path / "index", embedder=ColourEmbedder())
    for query in ["something green", "a blue sky", "red", "white snow", photos / "aaa-new.png"]:
        assert reloaded.search(query, k=4) == fresh.search(query, k=4)

    third = Recorder(ColourEmbedder())
    same = Index.build(photos, tmp_path / "index", third, shard_size=3, progress=False)
    assert third.sizes == []
    assert same.update.describe() == "10 photos: 0 added, 0 dropped, 0 changed, 10 kept (re-used)"
    # Another kind of FAISS index over the same photos: the embeddings are re-used, only FAISS builds again.
    fourth = Recorder(ColourEmbedder())
    hnsw = Index.build(photos, tmp_path / "index", fourth, approximate="hnsw", progress=False)
    assert fourth.sizes == [] and hnsw.meta["approximate"] == "hnsw" and hnsw.update.kept == 10
    reloaded = Index.load(tmp_path / "index", embedder=ColourEmbedder())
    assert reloaded.search("red", k=3) == fresh.search("red", k=3)


def test_unreadable_files_are_remembered_until_they_change(photos, tmp_path, monkeypatch):
    import cliptune.deploy.index as index_module

    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    Index.build(photos, tmp_path / "index", ColourEmbedder(), progress=False)
    opened = []
    real_open = index_module.open_rgb
    monkeypatch.setattr(index_module, "open_rgb",
                        lambda path, *args: opened.append(path.name) or real_open(path, *args))
    again = Index.build(photos, tmp_path / "index", ColourEmbedder(), progress=False)
    assert opened == [] and [item["path"] for item in again.meta["skipped"]] == ["broken.jpg"]
    Image.new("RGB", (12, 12), (1, 2, 3)).save(photos / "broken.jpg", format="JPEG")  # repaired
    later(photos / "broken.jpg")
    repaired = Index.build(photos, tmp_path / "index", ColourEmbedder(), progress=False)
    assert opened == ["broken.jpg"] and repaired.update.added == 1 and not repaired.meta["skipped"]


class OtherColourEmbedder(ColourEmbedder):
    spec = {"kind": "test-colour", "version": 2}


def _corrupt_embeddings(index: Path) -> None:
    np.save(index / "embeddings.npy", np.zeros((len(COLOURS), 3), np.float32))


def _old_format(index: Path) -> None:
    meta = json.loads((index / "meta.json").read_text())
    del meta["format"], meta["sizes"], meta["mtimes_ns"]
    (index / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("spoil, embedder, why", [
    (None, OtherColourEmbedder, "built with another embedder"),
    (_corrupt_embeddings, ColourEmbedder, "embeddings.npy is missing or is not the one meta.json was written"),
    (_old_format, ColourEmbedder, "built by an earlier cliptune"),
], ids=["other-embedder", "embeddings-not-meta's", "old-format"])
def test_an_index_that_cannot_be_reused_is_built_again_and_says_why(photos, tmp_path, caplog, spoil, embedder,
                                                                    why):
    Index.build(photos, tmp_path / "index", ColourEmbedder(), progress=False)
    if spoil:
        spoil(tmp_path / "index")
    recorder = Recorder(embedder())
    with caplog.at_level(logging.WARNING, logger="cliptune"):
        rebuilt = Index.build(photos, tmp_path / "index", recorder, progress=False)
    assert why in caplog.text and "embedding every photo again" in caplog.text
    assert len(recorder.sizes) == len(COLOURS) and rebuilt.update.added == len(COLOURS)
    assert why in rebuilt.update.started_over and rebuilt.meta["embedder"] == embedder.spec
    Index.build(photos, tmp_path / "fresh", embedder(), progress=False)
    assert np.array_equal(embeddings(tmp_path / "index"), embeddings(tmp_path / "fresh"))


def test_a_damaged_part_is_embedded_again(photos, tmp_path, caplog):
    with pytest.raises(InterruptedError):
        Index.build(photos, tmp_path / "index", ColourEmbedder(), shard_size=4, progress=False, max_shards=2)
    first, _ = sorted((tmp_path / "index" / "parts").glob("part-*.npy"))
    first.write_bytes(first.read_bytes()[:60])  # cut short, as by a full disk
    recorder = Recorder(ColourEmbedder())
    with caplog.at_level(logging.WARNING, logger="cliptune"):
        resumed = Index.build(photos, tmp_path / "index", recorder, shard_size=4, progress=False)
    assert f"{first.with_suffix('.json').name}: ignored" in caplog.text
    assert len(recorder.sizes) == 6 and resumed.update.resumed == 4  # that shard's 4 photos and the last 2
    Index.build(photos, tmp_path / "fresh", ColourEmbedder(), progress=False)
    assert np.array_equal(embeddings(tmp_path / "index"), embeddings(tmp_path / "fresh"))


def test_files_are_replaced_atomically_and_meta_json_last(photos, tmp_path, monkeypatch):
    """The contract a server reloading on a new meta.json relies on: embeddings.npy and index.faiss are
    renamed into place before meta.json, each from a temporary file."""
    Index.build(photos, tmp_path / "index", ColourEmbedder(), progress=False)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append((Path(src).name, Path(dst).name))
                        or real_replace(src, dst))
    change_folder(photos)
    Index.build(photos, tmp_path / "index", ColourEmbedder(), progress=False)
    targets = [dst for _, dst in renamed if not dst.startswith("part-")]
    assert targets == ["embeddings.npy", "index.faiss", "meta.json"]  # that order
    assert all(src.startswith(f".{dst}.tmp") for src, dst in renamed)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == targets  # no parts/, no temporary files


def test_load_refuses_a_faiss_file_that_does_not_match_meta(photos, tmp_path):
    Index.build(photos, tmp_path / "index", ColourEmbedder(), progress=False)
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    meta["paths"].append("late.jpg")
    (tmp_path / "index" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="index.faiss holds 10 photos, meta.json lists 11"):
        Index.load(tmp_path / "index")


def test_cli_reports_what_a_rebuild_did(photos, tmp_path, tiny_clip_dir, capsys):
    command = ["index", str(photos), "--out", str(tmp_path / "index"), "--model.name", str(tiny_clip_dir),
               "--train.device", "cpu", "--shard-size", "4"]
    assert main(command) == 0
    assert "indexed 10 photos: 10 added, 0 dropped, 0 changed, 0 kept (re-used)" in capsys.readouterr().out
    change_folder(photos)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(command) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "indexed 10 photos: 1 added, 1 dropped, 2 changed, 7 kept (re-used)"
    assert out[1].endswith("(16-d, exact); 1 unreadable skipped") and "broken.jpg" in out[2]
    # The same index as one built from scratch: the same rows, embeddings and answers.
    embedder = TorchEmbedder(str(tiny_clip_dir), device="cpu")
    fresh = Index.build(photos, tmp_path / "fresh", embedder, progress=False)
    updated = Index.load(tmp_path / "index", embedder=embedder)
    assert updated.paths == fresh.paths
    assert np.allclose(embeddings(tmp_path / "index"), embeddings(tmp_path / "fresh"), atol=1e-5)
    assert [p for p, _ in updated.search("a dog", k=5)] == [p for p, _ in fresh.search("a dog", k=5)]


# -- several processes ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build_worker(rank: int, world: int, port: int, model_dir: str, photos: str, out: str, record: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    from cliptune.distributed import LaunchedRanks

    ranks = LaunchedRanks()
    embedder = Recorder(TorchEmbedder(model_dir, device="cpu"))
    index = build_index(Path(photos), Path(out), embedder, shard_size=2, progress=False, ranks=ranks)
    Path(f"{record}.{rank}").write_text(json.dumps({"sizes": embedder.sizes, "returned": index is not None}))
    ranks.close()


def test_two_processes_build_the_index_one_process_builds(photos, tmp_path, tiny_clip_dir):
    record = str(tmp_path / "record")
    mp.spawn(_build_worker, nprocs=2, join=True,
             args=(2, _free_port(), str(tiny_clip_dir), str(photos), str(tmp_path / "two"), record))
    ranks = [json.loads(Path(f"{record}.{r}").read_text()) for r in range(2)]
    assert [r["returned"] for r in ranks] == [True, False]  # rank 0 writes the index, rank 1 only embeds
    # Shards of 2 photos in path order, shard i on rank i % 2: rank 0 embeds shards 0, 2, 4; rank 1 shards 1, 3.
    files = list_photo_files(photos)
    shards = [files[i:i + 2] for i in range(0, len(files), 2)]
    for rank, result in enumerate(ranks):
        expected = [size_of(photos, Path(f.path).stem) for shard in shards[rank::2] for f in shard]
        assert [tuple(size) for size in result["sizes"]] == expected
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["update"]["embedded_by_rank"] == [6, 4]
    one = Index.build(photos, tmp_path / "one", TorchEmbedder(str(tiny_clip_dir), device="cpu"), progress=False)
    assert meta["paths"] == one.paths
    assert np.allclose(embeddings(tmp_path / "two"), embeddings(tmp_path / "one"), atol=1e-5)


def test_torchrun_index_prints_once_and_each_rank_embeds_its_share(photos, tmp_path, tiny_clip_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "cliptune", "index", str(photos), "--out",
                          str(tmp_path / "index"), "--model.name", str(tiny_clip_dir), "--shard-size", "3"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines.count("indexed 10 photos: 10 added, 0 dropped, 0 changed, 0 kept (re-used)") == 1, run.stdout
    assert "  embedded on 2 processes: 6 + 4 photos" in lines  # shards of 3, 3, 3, 1: rank 0 has 0 and 2
    assert len(Index.load(tmp_path / "index").paths) == len(COLOURS)


def test_onnx_under_a_launcher_is_refused(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["index", str(photos), "--out", str(tmp_path / "index"), "--onnx", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "index --onnx under a launcher (2 processes)" in err and "--model.name" in err
    assert not (tmp_path / "index").exists()


# -- approximate indexes ---------------------------------------------------------------------------------

def test_ivf_lists_follow_four_sqrt_n_within_faiss_training_minimum():
    assert [ivf_lists(n) for n in (10, 1_000, 10_000, 100_000, 1_000_000)] == [1, 25, 256, 1265, 4000]
    assert all(ivf_lists(n) * 39 <= n for n in (39, 1_000, 10_000, 100_000, 1_000_000))


def test_ivf_trains_on_a_sample_without_faiss_warnings(capfd):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16)).astype(np.float32)
    vectors = centres[rng.integers(0, 20, 20_000)] + 0.3 * rng.standard_normal((20_000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sample = training_sample(vectors, 1000, seed=0)
    assert sample.shape == (1000, 16) and len(np.unique(sample, axis=0)) == 1000
    assert np.array_equal(sample, training_sample(vectors, 1000, seed=0))
    index = build_faiss_index(vectors, AnnSettings("ivf", nprobe=4, train_points=2000))
    assert index.ntotal == 20_000 and index.nlist == ivf_lists(20_000) and index.nprobe == 4
    assert build_faiss_index(vectors[:10], AnnSettings("ivf")).nlist == 1  # a handful of photos: one list
    assert "WARNING" not in capfd.readouterr().err  # faiss warns when k-means gets too few points
    exact = build_faiss_index(vectors, AnnSettings())
    queries = vectors[:50]
    assert index.search(queries, 1)[1].ravel().tolist() == exact.search(queries, 1)[1].ravel().tolist()


def test_nprobe_is_kept_in_meta_and_applied_on_load(tmp_path, capsys):
    photos = tmp_path / "many"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(120):
        Image.new("RGB", (4, 4), tuple(int(c) for c in rng.integers(0, 256, 3))).save(photos / f"{i:03d}.png")
    index = Index.build(photos, tmp_path / "index", ColourEmbedder(), approximate="ivf", nprobe=2, progress=False)
    assert index.meta["nlist"] == 3 and index.meta["nprobe"] == 2
    assert Index.load(tmp_path / "index").faiss_index.nprobe == 2
    with pytest.raises(ValueError, match="nprobe: 2 applies to an IVF index"):
        Index.build(photos, tmp_path / "hnsw", ColourEmbedder(), approximate="hnsw", nprobe=2, progress=False)
    assert main(["index", str(photos), "--out", str(tmp_path / "x"), "--onnx", "x", "--nprobe", "4"]) == 2
    assert "--nprobe 4: the lists an IVF index searches; add --approximate ivf" in capsys.readouterr().err


def test_ann_benchmark_short_runs_and_a_full_probe_is_exact():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ann.py"), "--short"], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| 2,000") or line.startswith("| 5,000")]
    assert run.stdout.startswith("CPU: ") and len(rows) == 12, run.stdout
    for _, kind, params, build_s, mib, p50, recall in rows:
        assert float(build_s) >= 0 and float(mib) > 0 and float(p50) > 0
        if kind == "exact (flat)":
            assert float(recall) == 1.0
        if kind == "IVF" and params.split("nprobe ")[1] == params.split(",")[0].split("nlist ")[1]:
            assert float(recall) == 1.0, params  # every list searched: exact
        if kind == "HNSW" and params.endswith("efSearch 128"):
            assert float(recall) >= 0.9, params
