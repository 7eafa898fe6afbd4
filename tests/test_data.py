"""Every annotation format yields the same image-caption records."""

import csv
import json
import zipfile
from pathlib import Path

import pytest

from cliptune.apps.download import lay_out_flickr30k
from cliptune.config import DataConfig
from cliptune.data.readers import DataError, detect_format, flatten_captions, read_split

IMAGES = [("a.jpg", ["a dog runs", "a brown dog"]), ("b.jpg", ["two cats", "cats sleeping", "a pair of cats"]),
          ("c.jpg", ["a red bus"])]
SPLITS = {"a.jpg": "train", "b.jpg": "train", "c.jpg": "test"}


def _pairs(records):
    return [(r.image_path.name, r.captions) for r in records]


def _expected(split):
    return [(name, tuple(caps)) for name, caps in IMAGES if SPLITS[name] == split]


def write_all_formats(root: Path) -> dict[str, DataConfig]:
    images = root / "images"
    images.mkdir(parents=True)
    configs = {}
    # Karpathy split JSON
    karpathy = {"images": [{"filename": n, "imgid": i, "split": SPLITS[n], "sentences": [{"raw": c} for c in caps]}
                           for i, (n, caps) in enumerate(IMAGES)], "dataset": "flickr30k"}
    (root / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    configs["karpathy"] = DataConfig(path=str(root / "dataset_flickr30k.json"), image_root=str(images))
    # COCO captions JSON, one file per split
    for split in ("train", "test"):
        names = [n for n, _ in IMAGES if SPLITS[n] == split]
        coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"image_id": i, "caption": c} for i, n in enumerate(names) for c in dict(IMAGES)[n]]}
        (root / f"captions_{split}.json").write_text(json.dumps(coco))
    configs["coco"] = DataConfig(path=str(root / "captions_{split}.json"))
    # nlphuji/flickr30k CSV
    with open(root / "flickr_annotations_30k.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        for i, (n, caps) in enumerate(IMAGES):
            writer.writerow([json.dumps(caps), json.dumps(list(range(len(caps)))), SPLITS[n], n, str(i)])
    configs["flickr30k_csv"] = DataConfig(path=str(root / "flickr_annotations_30k.csv"), image_root=str(images))
    # plain CSV, one pair per row
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "split"])
        for n, caps in IMAGES:
            for c in caps:
                writer.writerow([f"images/{n}", c, SPLITS[n]])
    configs["csv"] = DataConfig(path=str(root / "pairs.csv"))
    # JSONL, all captions on one line
    lines = [json.dumps({"image": f"images/{n}", "captions": caps, "split": SPLITS[n]}) for n, caps in IMAGES]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    configs["jsonl"] = DataConfig(path=str(root / "captions.jsonl"))
    return configs


def test_every_format_yields_the_same_pairs(tmp_path):
    configs = write_all_formats(tmp_path)
    for fmt, config in configs.items():
        assert detect_format(Path(config.path.replace("{split}", "train"))) == fmt
        for split in ("train", "test"):
            records, problems = read_split(config, split)
            assert _pairs(records) == _expected(split), fmt
            assert all(r.image_path.parent == tmp_path / "images" for r in records), fmt
            assert not problems.summary()


def test_karpathy_restval_counts_as_train(tmp_path):
    data = {"images": [{"filename": "x.jpg", "split": "restval", "imgid": 0, "sentences": [{"raw": "x"}]},
                       {"filename": "y.jpg", "split": "train", "imgid": 1, "sentences": [{"raw": "y"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(data))
    records, _ = read_split(DataConfig(path=str(tmp_path / "k.json")), "train")
    assert [r.image_id for r in records] == ["0", "1"]


def test_coco_mini_reads_with_five_captions_each(coco_mini):
    config = DataConfig(path=str(coco_mini / "captions_{split}.json"))
    train, _ = read_split(config, "train")
    val, _ = read_split(config, "val")
    assert (len(train), len(val)) == (80, 50)
    assert all(len(r.captions) == 5 and r.image_path.is_file() for r in train + val)
    texts, index = flatten_captions(val)
    assert len(texts) == 250 and index[:6] == [0, 0, 0, 0, 0, 1]


def test_missing_split_lists_the_splits_there_are(tmp_path):
    config = write_all_formats(tmp_path)["karpathy"]
    with pytest.raises(DataError, match=r"no images in split 'val'.*\['test', 'train'\]"):
        read_split(config, "val")


def test_max_images_limits_the_split(tmp_path):
    config = write_all_formats(tmp_path)["jsonl"]
    config.max_images = 1
    records, _ = read_split(config, "train")
    assert len(records) == 1


def _flickr_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        for i, (name, split) in enumerate(rows):
            writer.writerow([json.dumps([f"caption {k} of {name}" for k in range(5)]), "[]", split, name, str(i)])
    return path


def test_flickr30k_layout_unpacks_the_archive_and_checks_every_image(tmp_path):
    rows = [("1.jpg", "train"), ("2.jpg", "train"), ("3.jpg", "val"), ("4.jpg", "test")]
    csv_path = _flickr_csv(tmp_path / "flickr_annotations_30k.csv", rows)
    archive = tmp_path / "flickr30k-images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, _ in rows:
            zf.writestr(f"flickr30k-images/{name}", b"jpeg bytes of " + name.encode())
        zf.writestr("__MACOSX/flickr30k-images/._1.jpg", b"junk")
        zf.writestr("../../evil.jpg", b"must not escape")
    layout = lay_out_flickr30k(csv_path, archive, tmp_path / "out")
    assert layout.images_per_split == {"train": 2, "val": 1, "test": 1}
    assert sorted(p.name for p in layout.image_root.iterdir()) == ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "evil.jpg"]
    assert not (tmp_path / "evil.jpg").exists()
    records, _ = read_split(DataConfig(path=str(layout.annotations), image_root=str(layout.image_root)), "val")
    assert records[0].image_path.read_bytes() == b"jpeg bytes of 3.jpg"
    assert len(records[0].captions) == 5


def test_flickr30k_layout_reports_missing_images(tmp_path):
    csv_path = _flickr_csv(tmp_path / "f.csv", [("1.jpg", "train"), ("2.jpg", "val"), ("3.jpg", "test")])
    archive = tmp_path / "flickr30k-images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("flickr30k-images/1.jpg", b"x")
    with pytest.raises(FileNotFoundError, match="not in"):
        lay_out_flickr30k(csv_path, archive, tmp_path / "out")


def test_cli_download_fetches_both_files_from_the_hub_dataset(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from cliptune.apps.cli import main

    rows = [("1.jpg", "train"), ("2.jpg", "val"), ("3.jpg", "test")]
    csv_path = _flickr_csv(tmp_path / "flickr_annotations_30k.csv", rows)
    archive = tmp_path / "flickr30k-images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, _ in rows:
            zf.writestr(f"flickr30k-images/{name}", b"x")
    asked = []

    def fake_download(repo_id, filename, repo_type=None, revision=None):
        asked.append((repo_id, filename, repo_type))
        return str(csv_path if filename.endswith(".csv") else archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert main(["data", "download", "flickr30k", "--out", str(tmp_path / "out")]) == 0
    assert asked == [("nlphuji/flickr30k", "flickr_annotations_30k.csv", "dataset"),
                     ("nlphuji/flickr30k", "flickr30k-images.zip", "dataset")]
    assert "{'train': 1, 'val': 1, 'test': 1}" in capsys.readouterr().out


def test_flickr30k_download_reads_with_the_csv_alone(tmp_path):
    """`cliptune eval --data data/flickr30k/flickr_annotations_30k.csv` (the README's command) sets no
    image_root: the images unpacked into flickr30k-images/ beside the CSV must be found."""
    rows = [("10.jpg", "train"), ("11.jpg", "val"), ("12.jpg", "test")]
    csv_path = _flickr_csv(tmp_path / "flickr_annotations_30k.csv", rows)
    archive = tmp_path / "flickr30k-images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, _ in rows:
            zf.writestr(f"flickr30k-images/{name}", b"bytes of " + name.encode())
    layout = lay_out_flickr30k(csv_path, archive, tmp_path / "data" / "flickr30k")
    records, _ = read_split(DataConfig(path=str(layout.annotations)), "test")
    assert [r.image_path for r in records] == [layout.image_root / "12.jpg"]
    assert records[0].image_path.read_bytes() == b"bytes of 12.jpg"
