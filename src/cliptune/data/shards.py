"""WebDataset shards: .tar files whose samples hold an image and its captions.

A sample is the tar members sharing one key: the image (`.jpg`, `.jpeg`, `.png` or `.webp`) and its
captions, as `.txt` (one caption a line) or `.json` (`{"captions": [...]}` or `{"caption": "..."}`).
Shards are named with a brace pattern: `shards/train-{000000..000003}.tar`.

Training streams the shards (`cliptune.data.streaming`); `materialize_webdataset` extracts them into an
image folder and the `captions.jsonl` that `cliptune.data.readers` reads (evaluation, the image cache).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS
from cliptune.data.images import ImageError, decode_opened, own_pixel_limit
from cliptune.data.readers import ImageCaptions
from cliptune.extras import require

# WebDataset member keys (the name after the sample key's first dot, no dot of its own) that hold a
# sample's image: a subset of the file suffixes `images.IMAGE_SUFFIXES` lists.
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_SUFFIX_TO_KEY = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class ShardStats:
    """What reading shards skipped (reported, never silent)."""

    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample key or shard, reason)


def decode_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       draft_size: int | None = None) -> Image.Image:
    """Bytes of an image file -> 8-bit upright RGB, with the same checks as `images.open_rgb`
    (`draft_size`: decode a large JPEG at a reduced scale, as there)."""
    try:
        with own_pixel_limit(), Image.open(io.BytesIO(data)) as image:  # data.max_image_pixels, not PIL's limit
            return decode_opened(image, name, max_pixels, draft_size)
    except ImageError:
        raise
    except Exception as err:  # PIL raises many types for corrupt bytes; each means "unusable"
        raise ImageError(f"{name}: unreadable image ({type(err).__name__}: {err})") from None


def sample_captions(sample: dict, key: str) -> list[str]:
    """The non-empty captions of a sample's `.txt` (one a line) or `.json` (`captions` or `caption`)
    member, given as bytes. A missing or malformed member raises ValueError (or UnicodeDecodeError)."""
    if "txt" in sample:
        text = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else sample["txt"]
        return [line.strip() for line in text.splitlines() if line.strip()]
    if "json" in sample:
        meta = json.loads(sample["json"]) if isinstance(sample["json"], (bytes, str)) else sample["json"]
        if not isinstance(meta, dict):
            raise ValueError(f"{key}: .json holds a {type(meta).__name__}, not an object")
        many = meta.get("captions", meta.get("caption"))
        many = [many] if isinstance(many, str) else list(many or [])
        return [str(c).strip() for c in many if str(c).strip()]
    raise ValueError(f"{key}: no .txt or .json captions")


def _image_member(sample: dict) -> tuple[str, bytes]:
    for ext in SHARD_IMAGE_KEYS:
        if ext in sample:
            return ext, sample[ext]
    raise ValueError(f"no image member (.{', .'.join(SHARD_IMAGE_KEYS)}); members: {sorted(k for k in sample if not k.startswith('__'))}")


def iter_webdataset(pattern: str, decode: bool = True, stats: ShardStats | None = None,
                    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[tuple[str, Image.Image | bytes, list[str]]]:
    """(key, image, captions) for each usable sample of the shards, in order. `decode=False` yields the
    image file's bytes untouched. Corrupt samples (and unreadable shards) are skipped and counted in `stats`."""
    for key, image, captions, _ in _iter_samples(pattern, decode, stats, max_pixels):
        yield key, image, captions


def iter_raw_samples(urls: str | list[str], stats: ShardStats | None = None) -> Iterator[tuple[str, str, bytes, list[str], dict]]:
    """(shard url, key, image file bytes, captions, sample) for each sample with an image member and a
    caption, in shard order, images not decoded. Samples without them, and unreadable shards, are
    skipped and counted in `stats`."""
    wds = require("webdataset", "shards")

    stats = stats if stats is not None else ShardStats()

    def on_error(err: Exception) -> bool:
        stats.skipped.append(("shard", f"{type(err).__name__}: {err}"))
        return True  # go on with the next sample/shard

    # No node or worker splitting here: callers decide who reads what (`cliptune.data.streaming` does).
    dataset = wds.WebDataset(urls, shardshuffle=False, handler=on_error, empty_check=False,
                             nodesplitter=None, workersplitter=None)
    for sample in dataset:
        url = sample.get("__url__", "")
        name = f"{url}:{sample.get('__key__', '?')}"
        try:
            _, data = _image_member(sample)
            captions = sample_captions(sample, name)
            if not captions:
                raise ValueError("no non-empty caption")
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            stats.skipped.append((name, str(err)))
            continue
        yield url, sample["__key__"], data, captions, sample


def _iter_samples(pattern: str, decode: bool, stats: ShardStats | None, max_pixels: int):
    stats = stats if stats is not None else ShardStats()
    for url, key, data, captions, sample in iter_raw_samples(pattern, stats):
        name = f"{url}:{key}"
        try:
            image = decode_image_bytes(data, name, max_pixels)  # refuse corrupt bytes here, not in training
        except ImageError as err:
            stats.skipped.append((name, str(err)))
            continue
        stats.samples += 1
        yield key, (image if decode else data), captions, _json_split(sample)


def _json_split(sample: dict) -> str | None:
    try:
        return json.loads(sample["json"]).get("split") if "json" in sample else None
    except (ValueError, AttributeError):
        return None


def _safe_key(text: str) -> str:
    # WebDataset splits a member name at its first dot into key and extension.
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def write_webdataset(records: Iterable[ImageCaptions], out_pattern: str, shard_size: int = 1000,
                     split: str | None = None) -> list[Path]:
    """Pack records into shards named by `out_pattern` (a %-format, e.g. `shards/train-%06d.tar`).
    Image files are stored as they are (no re-encoding); captions as `.json`. Returns the shard paths."""
    wds = require("webdataset", "shards")

    if "%" not in out_pattern:
        raise ValueError(f"out_pattern {out_pattern!r} needs a shard number placeholder such as %06d")
    Path(out_pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with wds.ShardWriter(out_pattern, maxcount=shard_size, verbose=0) as sink:
        for i, record in enumerate(records):
            ext = _SUFFIX_TO_KEY.get(Path(record.image_path).suffix.lower())
            if ext is None:
                raise ValueError(f"{record.image_path}: only {', '.join(SHARD_IMAGE_KEYS)} images go into shards")
            meta = {"captions": list(record.captions), "image_id": record.image_id}
            if split is not None:
                meta["split"] = split
            sink.write({"__key__": f"{i:08d}_{_safe_key(record.image_id)}", ext: Path(record.image_path).read_bytes(),
                        "json": json.dumps(meta).encode("utf-8")})
            name = sink.fname
            if name and (not written or written[-1] != Path(name)):
                written.append(Path(name))
    return written


def materialize_webdataset(pattern: str, out_dir: str | os.PathLike, split: str = "train",
                           stats: ShardStats | None = None) -> Path:
    """Extract shards to `out_dir/images/` and `out_dir/captions.jsonl` (the JSONL format of
    `cliptune.data.readers`; each line's split is the sample's own `split` if its json has one, else `split`).
    Appends to an existing captions.jsonl, so several shard sets (train, val) can share one folder.
    Returns the captions.jsonl path, to use as `data.path`."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for key, data, captions, own_split in _iter_samples(pattern, False, stats, DEFAULT_MAX_IMAGE_PIXELS):
        ext = Image.open(io.BytesIO(data)).format.lower().replace("jpeg", "jpg")
        rel = f"images/{_safe_key(key)}.{ext}"
        (out_dir / rel).write_bytes(data)
        lines.append({"image": rel, "captions": captions, "split": own_split or split})
    with open(out_dir / "captions.jsonl", "a", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    return out_dir / "captions.jsonl"
