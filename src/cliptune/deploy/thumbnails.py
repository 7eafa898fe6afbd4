"""Thumbnails for the search page: made once per photo version, cached as small JPEGs.

A thumbnail's file name is a hash of the photo's path relative to the photo folder, its
modification time and size, and the thumbnail size: an edited or replaced photo gets a new
thumbnail, and an unchanged one is never decoded again. Writes go to a temporary file renamed into
place (`os.replace`), so two requests making the same thumbnail at once each write a whole file and
a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from PIL import Image

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS
from cliptune.data.images import open_rgb

THUMBNAIL_DIR = "thumbnails"  # inside the index folder, unless the server is given another
JPEG_QUALITY = 85  # small files without visible blocking at grid size


def thumbnail_key(relative_path: str, photo: Path, size: int) -> str:
    """The cache file's name: the photo's relative path + mtime + size, and the thumbnail size."""
    stat = photo.stat()
    text = f"{relative_path}\0{stat.st_mtime_ns}\0{stat.st_size}\0{size}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def make_thumbnail(photo: Path, size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """`photo` scaled down so that its shorter side is `size` (never up): the grid crops thumbnails
    to squares, so the shorter side is the one that must stay sharp."""
    # A JPEG draft decodes at 1/2, 1/4 or 1/8 scale when that still covers `size`: a thumbnail
    # needs no exact pixels, and the draft is several times faster than a full decode.
    image = open_rgb(photo, max_pixels, draft_size=size)
    scale = size / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def cached_thumbnail(photo: Path, relative_path: str, cache_dir: Path, size: int = 256,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Path:
    """The cached JPEG thumbnail of `photo`, made now if this version of it has none yet.
    Raises cliptune.data.images.ImageError if the photo cannot be read."""
    key = thumbnail_key(relative_path, photo, size)
    out = Path(cache_dir) / key[:2] / f"{key}.jpg"
    if out.is_file():
        return out
    image = make_thumbnail(photo, size, max_pixels)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            image.save(file, "JPEG", quality=JPEG_QUALITY, optimize=True)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out
