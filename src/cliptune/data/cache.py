"""An image cache: every image decoded and resized once, read back as uint8 pixels from a memory map.

Decoding a JPEG costs milliseconds; reading 256x256x3 bytes from a memory-mapped file costs
microseconds. `build_cache` writes, in `cache_dir`:

- `images.u8`: a `np.memmap` of shape (N, S, S, 3) uint8; row i is image i, resized to S by a
  `ResizeRule` (default CLIP's: shorter side to S, then the centre square). Built at the model's
  input size with the model's rule, a row is exactly what the model's image processor makes before
  its rescale and normalisation, so training and evaluation read it as is. Built a little larger
  (e.g. 256 for 224) it leaves random crops room, but un-augmented pixels are then resized twice:
  close to the processor's, not identical (`ImageCache.mismatch` says why; the trainer warns).
- `index.json`: {"size": S, "resize": ResizeRule.to_dict(), "paths": {absolute path: row},
  "bad": [[path, reason], ...]}. A cache without "resize" predates exact preprocessing.
- `done.npy`: one byte a row (0 to do, 1 cached, 2 unreadable), flushed every few seconds. An
  interrupted build resumes where it stopped: finished rows are not decoded again.

`ImageCache` reads it back: `get_pil(path)` (what training and evaluation call) or the faster
`get_array(path)`. It pickles without its memory map, so each DataLoader worker maps the file itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cliptune.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, ImageTransform, ResizeRule, open_rgb
from cliptune.data.readers import ImageCaptions

log = logging.getLogger(__name__)

IMAGES_FILE = "images.u8"
INDEX_FILE = "index.json"
DONE_FILE = "done.npy"
TODO, DONE, BAD = 0, 1, 2
FLUSH_SECONDS = 5.0  # how much work an interruption can lose


class CacheError(ValueError):
    """A cache folder that cannot be built or read as asked; the message says why."""


@dataclass
class CacheStats:
    cache_dir: Path
    size: int
    total: int  # distinct images in the cache
    cached: int  # rows decoded by this call
    already_done: int  # rows found finished by an earlier (interrupted) build
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of every unreadable image
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.cached / self.seconds if self.seconds > 0 else 0.0
        text = (f"cache {self.cache_dir}: {self.total} images at {self.size}x{self.size} "
                f"({self.cached} decoded now at {rate:.0f} images/s, {self.already_done} already done, "
                f"{len(self.bad)} unreadable skipped)")
        for path, why in self.bad[:5]:
            text += f"\n  unreadable: {why}" if why.startswith(path) else f"\n  unreadable: {path}: {why}"
        return text


def cache_key(path: str | os.PathLike) -> str:
    """Paths are looked up absolute, so `images/a.jpg` and `./images/a.jpg` are one image."""
    return os.path.abspath(os.fspath(path))


def _unique_paths(records) -> list[str]:
    if isinstance(records, dict):
        records = [r for split in records.values() for r in split]
    seen: dict[str, None] = {}
    for record in records:
        path = record.image_path if isinstance(record, ImageCaptions) else record
        seen.setdefault(cache_key(path), None)
    return list(seen)


# -- building ---------------------------------------------------------------------------------------

_worker_images: np.memmap | None = None


def _worker_init(images_path: str, shape: tuple[int, ...]) -> None:
    global _worker_images
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it saves progress
    _worker_images = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)


def _decode_rows(jobs: list[tuple[int, str]], size: int, rule: ResizeRule,
                 max_pixels: int) -> list[tuple[int, str | None]]:
    """Decode and write each (row, path) into the shared memory map; return (row, error or None)."""
    out = []
    for row, path in jobs:
        try:
            # A full decode (no JPEG draft): a reduced-scale decode would not give the processor's pixels.
            image = rule.apply(open_rgb(Path(path), max_pixels), size)
            _worker_images[row] = np.asarray(image, dtype=np.uint8)
            out.append((row, None))
        except ImageError as err:
            out.append((row, str(err)))
    return out


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)  # a crash mid-write never leaves a half index


def build_cache(records, cache_dir: str | os.PathLike, size: int = 256, workers: int | None = None,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, progress: bool = True, chunk: int = 16,
                rule: ResizeRule | None = None) -> CacheStats:
    """Decode every image of `records` (a list of ImageCaptions or paths, or {split: list}) once into
    `cache_dir`, resized to `size` by `rule` (default CLIP's; pass `Preprocessing.resize_rule` and
    `image_size` for the model's exact pixels). Resumes an interrupted build of the same images;
    unreadable images are skipped and listed."""
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    if size < 8:
        raise CacheError(f"size: {size} is too small for an image cache (use the model input size or a bit more)")
    rule = (rule or ResizeRule()).at(size)
    paths = _unique_paths(records)
    if not paths:
        raise CacheError("no images to cache")
    cache_dir.mkdir(parents=True, exist_ok=True)
    shape = (len(paths), size, size, 3)
    index_path, done_path, images_path = cache_dir / INDEX_FILE, cache_dir / DONE_FILE, cache_dir / IMAGES_FILE
    state = None
    if index_path.is_file() and done_path.is_file() and images_path.is_file():
        old = json.loads(index_path.read_text(encoding="utf-8"))
        if old.get("size") != size or old.get("resize") != rule.to_dict() or list(old.get("paths", {})) != paths:
            raise CacheError(f"{cache_dir} holds a cache of other images or another size or resize rule "
                             f"({old.get('size')} px, {old.get('resize', 'resized before exact preprocessing')}); "
                             f"use a new folder or delete it")
        state = np.load(done_path)
        bad = {p: why for p, why in old.get("bad", [])}
    if state is None:
        np.memmap(images_path, dtype=np.uint8, mode="w+", shape=shape).flush()  # sparse file of the full size
        state = np.zeros(len(paths), dtype=np.uint8)
        bad = {}
    index = {"size": size, "resize": rule.to_dict(), "paths": {p: i for i, p in enumerate(paths)}, "bad": []}

    def flush() -> None:
        np.save(done_path.with_suffix(".tmp.npy"), state)
        os.replace(done_path.with_suffix(".tmp.npy"), done_path)
        index["bad"] = sorted(bad.items())
        _write_json(index_path, index)

    flush()
    already = int((state != TODO).sum())
    todo = [(int(i), paths[i]) for i in np.flatnonzero(state == TODO)]
    jobs = [todo[i: i + chunk] for i in range(0, len(todo), chunk)]
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(paths), initial=already, desc="caching images", unit="img", disable=not progress,
               mininterval=1.0)
    last_flush = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init,
                                 initargs=(str(images_path), shape)) as pool:
            futures = [pool.submit(_decode_rows, job, size, rule, max_pixels) for job in jobs]
            try:
                for future in futures:
                    for row, error in future.result():
                        state[row] = BAD if error else DONE
                        if error:
                            bad[paths[row]] = error
                    bar.update(len(future.result()))
                    if time.perf_counter() - last_flush > FLUSH_SECONDS:
                        flush()
                        last_flush = time.perf_counter()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()
        flush()  # finished rows survive an interruption: the next build skips them
    return CacheStats(cache_dir, size, len(paths), int((state != TODO).sum()) - already, already,
                      sorted(bad.items()), time.perf_counter() - started)


# -- reading ------------------------------------------------------------------------------------------


class ImageCache:
    """Read-only view of a built cache. Unknown or unreadable paths raise `ImageError` naming the path."""

    def __init__(self, cache_dir: Path, size: int, rows: dict[str, int], bad: dict[str, str], done: np.ndarray,
                 rule: ResizeRule | None = None):
        self.cache_dir = Path(cache_dir)
        self.size = size
        self.rule = rule  # None: built before exact preprocessing (rounded resize, JPEG drafts)
        self.rows = rows
        self.bad = bad
        self.done = done
        self._images: np.memmap | None = None
        self._exact: dict[tuple, bool] = {}

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, expect: ImageTransform | None = None) -> ImageCache:
        """Open a built cache; with `expect` (the model's un-augmented transform), log a warning when
        its pixels are not exactly the model processor's."""
        cache_dir = Path(cache_dir)
        index_path = cache_dir / INDEX_FILE
        if not index_path.is_file() or not (cache_dir / IMAGES_FILE).is_file():
            raise CacheError(f"data.cache_dir: {cache_dir} is not an image cache (build one with `cliptune data cache`)")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        done = np.load(cache_dir / DONE_FILE)
        rule = ResizeRule.from_dict(index["resize"]) if "resize" in index else None
        cache = cls(cache_dir, int(index["size"]), dict(index["paths"]), dict(index.get("bad", [])), done, rule)
        why = cache.mismatch(expect) if expect is not None else None
        if why:
            log.warning("data.cache_dir %s: %s; un-augmented training and evaluation resize the cached pixels again, "
                        "so they are close to the model's image processor but not identical", cache_dir, why)
        return cache

    def mismatch(self, transform: ImageTransform) -> str | None:
        """Why this cache's rows are not `transform`'s exact output, or None when they are."""
        if self.rule is None:
            return "it was built before cliptune matched the model's preprocessing exactly (rebuild it)"
        if self.size != transform.size:
            return (f"it holds {self.size} px images and the model takes {transform.size} px "
                    f"(build it at {transform.size} for the model's exact pixels)")
        wanted = transform.rule.at(transform.size)
        if self.rule != wanted:
            return f"it was resized by {self.rule.to_dict()} and the model's processor resizes by {wanted.to_dict()}"
        return None

    def exact_for(self, transform: ImageTransform) -> bool:
        """True when a row is exactly `transform`'s output (un-augmented), so it can be used as is."""
        key = (transform.size, transform.rule)  # asked once an image: remembered (a few % of a cached read)
        if key not in self._exact:
            self._exact[key] = self.mismatch(transform) is None
        return self._exact[key]

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, path) -> bool:
        row = self.rows.get(cache_key(path))
        return row is not None and self.done[row] == DONE

    @property
    def complete(self) -> bool:
        return bool((self.done != TODO).all())

    def __getstate__(self) -> dict:
        # The memory map is not pickled: each DataLoader worker opens its own, lazily.
        return {**self.__dict__, "_images": None}

    def _array(self) -> np.memmap:
        if self._images is None:
            shape = (len(self.rows), self.size, self.size, 3)
            self._images = np.memmap(self.cache_dir / IMAGES_FILE, dtype=np.uint8, mode="r", shape=shape)
        return self._images

    def get_array(self, path) -> np.ndarray:
        """(S, S, 3) uint8 pixels of `path` (a private copy, safe to modify)."""
        key = cache_key(path)
        row = self.rows.get(key)
        if row is None:
            raise ImageError(f"{path}: not in the image cache {self.cache_dir} (rebuild it with `cliptune data cache`)")
        status = self.done[row]
        if status == BAD:
            raise ImageError(self.bad.get(key, f"{path}: unreadable when the cache was built"))
        if status != DONE:
            raise ImageError(f"{path}: not cached yet (the build of {self.cache_dir} was interrupted; run it again)")
        return np.array(self._array()[row])

    def get_pil(self, path) -> Image.Image:
        """The cached image as an RGB PIL image (S x S), for the usual transforms."""
        return Image.fromarray(self.get_array(path))
