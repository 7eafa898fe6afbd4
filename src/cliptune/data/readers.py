"""Image-caption datasets in the formats people actually hold them, read into one record type.

Every reader returns `list[ImageCaptions]`: one record per image with *all* its captions, so the
5-captions-per-image protocol and multi-positive losses need no special cases downstream.
Supported: Karpathy's split JSON (`dataset_flickr30k.json`, `dataset_coco.json`), COCO captions
JSON, the Flickr30k CSV of the `nlphuji/flickr30k` hub dataset, and plain CSV / JSONL files.
WebDataset shards are streamed instead (see `cliptune.data.shards`).
"""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from cliptune.config import DataConfig

# The folder `nlphuji/flickr30k`'s image archive unpacks to; read as the default image root beside its CSV.
FLICKR30K_IMAGE_FOLDER = "flickr30k-images"


class DataError(ValueError):
    """Annotations that cannot be used; the message names the file, line or field."""


@dataclass(frozen=True)
class ImageCaptions:
    image_id: str
    image_path: Path
    captions: tuple[str, ...]


@dataclass
class SplitProblems:
    """What was dropped while reading annotations (reported, never silent)."""

    empty_captions: int = 0
    images_without_captions: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        lines = []
        if self.empty_captions:
            lines.append(f"{self.empty_captions} empty or whitespace-only captions dropped")
        if self.images_without_captions:
            shown = ", ".join(self.images_without_captions[:5])
            lines.append(f"{len(self.images_without_captions)} images without captions dropped ({shown}...)")
        return lines


def detect_format(path: Path) -> str:
    """Decide the annotation format from the file name and its first bytes."""
    name = path.name.lower()
    if ".tar" in name:
        return "webdataset"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".csv"):
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            header = next(csv.reader(handle), [])
        return "flickr30k_csv" if {"raw", "filename", "split"} <= set(header) else "csv"
    if name.endswith(".json"):
        head = _read_json(path)
        if isinstance(head, dict) and "annotations" in head and "images" in head:
            return "coco"
        if isinstance(head, dict) and isinstance(head.get("images"), list) and head["images"] \
                and "sentences" in head["images"][0]:
            return "karpathy"
        raise DataError(f"{path}: JSON is neither COCO captions (images + annotations) nor a Karpathy split (images[].sentences)")
    raise DataError(f"{path}: cannot tell the annotation format from the name; set data.format")


def read_split(cfg: DataConfig, split: str) -> tuple[list[ImageCaptions], SplitProblems]:
    """All images of `split` with their captions, in file order (first `cfg.max_images` if set)."""
    if not cfg.path:
        raise DataError("data.path is empty: point it at the annotations (see docs/data.md)")
    path = Path(cfg.path.replace("{split}", split))
    if not path.exists():
        hint = " (it has a {split} placeholder)" if "{split}" in cfg.path else ""
        raise DataError(f"data.path: {path} does not exist{hint}")
    fmt = cfg.format if cfg.format != "auto" else detect_format(path)
    image_root = Path(cfg.image_root.replace("{split}", split)) if cfg.image_root else _default_image_root(path, fmt)
    problems = SplitProblems()
    readers = {
        "karpathy": _read_karpathy,
        "coco": _read_coco,
        "flickr30k_csv": _read_flickr30k_csv,
        "csv": _read_csv,
        "jsonl": _read_jsonl,
    }
    if fmt not in readers:
        raise DataError(f"{path}: WebDataset shards are streamed by training, not read as a list; to evaluate or "
                        "cache them, extract them first: cliptune data unpack '<pattern>' --out <folder>")
    grouped = readers[fmt](path, split, image_root)
    records = []
    for image_id, (image_path, captions) in grouped.items():
        kept = tuple(c.strip() for c in captions if isinstance(c, str) and c.strip())
        problems.empty_captions += len(captions) - len(kept)
        if not kept:
            problems.images_without_captions.append(image_id)
            continue
        records.append(ImageCaptions(image_id=image_id, image_path=image_path, captions=kept))
    if not records:
        raise DataError(f"{path}: split {split!r} has no images with captions"
                        f"{'' if grouped else ' (does the split exist? check data.' + _split_field(cfg, split) + ')'}")
    if cfg.max_images is not None:
        records = records[: cfg.max_images]
    return records, problems


def _split_field(cfg: DataConfig, split: str) -> str:
    for name in ("train_split", "val_split", "test_split"):
        if getattr(cfg, name) == split:
            return name
    return "train_split"


def _default_image_root(path: Path, fmt: str) -> Path:
    folder = path.parent
    if fmt in ("csv", "jsonl"):
        return folder  # paths in our own formats are relative to the annotation file
    # COCO and Flickr30k annotations name bare files, usually kept in an images/ folder beside them;
    # `cliptune data download flickr30k` unpacks into the archive's own folder name.
    candidates = (FLICKR30K_IMAGE_FOLDER, "images") if fmt == "flickr30k_csv" else ("images",)
    for name in candidates:
        if (folder / name).is_dir():
            return folder / name
    return folder


def _read_json(path: Path):
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}): re-save the file as UTF-8") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err


def _add(grouped, image_id: str, image_path: Path, captions: list[str], where: str) -> None:
    if image_id in grouped:
        previous_path, previous = grouped[image_id]
        if previous_path != image_path:
            raise DataError(f"{where}: image id {image_id!r} is used for two files: {previous_path} and {image_path}")
        previous.extend(captions)
    else:
        grouped[image_id] = (image_path, list(captions))


def _read_karpathy(path: Path, split: str, image_root: Path):
    data = _read_json(path)
    # Karpathy's "restval" images are part of the training set in every paper that uses the split.
    wanted = {"train", "restval"} if split == "train" else {split}
    grouped: OrderedDict = OrderedDict()
    seen_splits = set()
    for i, item in enumerate(data.get("images", [])):
        seen_splits.add(item.get("split"))
        if item.get("split") not in wanted:
            continue
        if "filename" not in item:
            raise DataError(f"{path}: images[{i}] has no 'filename'")
        rel = Path(item.get("filepath", "")) / item["filename"]
        captions = [s.get("raw", "") for s in item.get("sentences", [])]
        image_id = str(item.get("cocoid", item.get("imgid", item["filename"])))
        if image_id in grouped:
            raise DataError(f"{path}: images[{i}] repeats image id {image_id!r}")
        _add(grouped, image_id, image_root / rel, captions, str(path))
    if not grouped:
        raise DataError(f"{path}: no images in split {split!r}; the file has splits {sorted(s for s in seen_splits if s)}")
    return grouped


def _read_coco(path: Path, split: str, image_root: Path):
    data = _read_json(path)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: COCO captions JSON needs a list {key!r}")
    grouped: OrderedDict = OrderedDict()
    for i, image in enumerate(data["images"]):
        if "id" not in image or "file_name" not in image:
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        image_id = str(image["id"])
        if image_id in grouped:
            raise DataError(f"{path}: images[{i}] repeats image id {image_id}")
        grouped[image_id] = (image_root / image["file_name"], [])
    for i, ann in enumerate(data["annotations"]):
        image_id = str(ann.get("image_id"))
        if image_id not in grouped:
            raise DataError(f"{path}: annotations[{i}] refers to image_id {ann.get('image_id')!r}, which is not in images")
        grouped[image_id][1].append(ann.get("caption", ""))
    return grouped


def _read_flickr30k_csv(path: Path, split: str, image_root: Path):
    """The `nlphuji/flickr30k` CSV: raw (JSON list of 5 captions), sentids, split, filename, img_id."""
    grouped: OrderedDict = OrderedDict()
    splits = set()
    for line_no, row in _csv_rows(path, required=("raw", "filename", "split")):
        splits.add(row["split"])
        if row["split"] != split:
            continue
        try:
            captions = json.loads(row["raw"])
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: field 'raw' is not a JSON list of captions: {err.msg}") from err
        image_id = row.get("img_id") or row["filename"]
        if image_id in grouped:
            raise DataError(f"{path}:{line_no}: image id {image_id!r} appears twice")
        grouped[image_id] = (image_root / row["filename"], list(captions))
    if not grouped:
        raise DataError(f"{path}: no rows in split {split!r}; the file has splits {sorted(splits)}")
    return grouped


def _read_csv(path: Path, split: str, image_root: Path):
    """A CSV with `image` and `caption` (one pair per row) or `captions` (a JSON list), optional `split`."""
    grouped: OrderedDict = OrderedDict()
    for line_no, row in _csv_rows(path, required=("image",)):
        if "caption" not in row and "captions" not in row:
            raise DataError(f"{path}: needs a 'caption' or 'captions' column")
        if row.get("split") not in (None, "", split):
            continue
        captions = _parse_captions(row.get("captions"), row.get("caption"), f"{path}:{line_no}")
        _add(grouped, row["image"], image_root / row["image"], captions, f"{path}:{line_no}")
    return grouped


def _read_jsonl(path: Path, split: str, image_root: Path):
    """One JSON object a line: `image`, `captions` (list) or `caption` (string), optional `split`."""
    grouped: OrderedDict = OrderedDict()
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}): re-save the file as UTF-8") from err
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: invalid JSON: {err.msg}") from err
        if not isinstance(row, dict) or "image" not in row:
            raise DataError(f"{path}:{line_no}: each line needs an 'image' field")
        if row.get("split") not in (None, "", split):
            continue
        captions = _parse_captions(row.get("captions"), row.get("caption"), f"{path}:{line_no}")
        _add(grouped, str(row.get("id", row["image"])), image_root / row["image"], captions, f"{path}:{line_no}")
    return grouped


def _parse_captions(many, one, where: str) -> list[str]:
    if many not in (None, ""):
        if isinstance(many, str):
            try:
                many = json.loads(many)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: 'captions' must be a JSON list of strings") from err
        if not isinstance(many, list):
            raise DataError(f"{where}: 'captions' must be a list of strings, got {type(many).__name__}")
        return [str(c) for c in many]
    return [one] if one is not None else []


def _csv_rows(path: Path, required: tuple[str, ...]):
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}): re-save the file as UTF-8") from err
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
    yield from enumerate(reader, start=2)  # line 1 is the header


def flatten_captions(records: list[ImageCaptions]) -> tuple[list[str], list[int]]:
    """All captions of a split and, for each, the index of its image (the retrieval protocol's ground truth)."""
    texts, text_image_index = [], []
    for image_index, record in enumerate(records):
        texts.extend(record.captions)
        text_image_index.extend([image_index] * len(record.captions))
    return texts, text_image_index
