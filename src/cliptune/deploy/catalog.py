"""What an index folder knows about each photo, so that a rebuild embeds only what is new or changed.

A photo is known by its path relative to the photo folder, its size and its modification time in
nanoseconds (as rclip keys its database): while all three are the same its embedding is re-used; a
file whose size or mtime_ns differ is embedded again. (A file rewritten with the same size inside
the same nanosecond tick of its clock is not noticed; neither does rclip notice it.)

Known embeddings come from two places:
- the last finished build: `embeddings.npy` (row i is `meta.json`'s `paths[i]`, whose `sizes[i]` and
  `mtimes_ns[i]` it was embedded at), trusted only while its SHA-256 is the one meta.json recorded;
- `parts/`: shards embedded since, by a build that was interrupted or by the ranks of a distributed
  build. A part is `part-<key>.npy` (its embeddings) and `part-<key>.json` (its rows and unreadable
  files, the embedder, the run and rank that wrote it); the .json is written last, atomically, so a
  part whose .json exists is complete.

Unreadable files are remembered the same way (with their reason) and are not opened again until
they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cliptune.data.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"
PARTS_DIR = "parts"
FORMAT = 2  # meta.json's "format": 2 has embeddings.npy and the sizes / mtimes_ns of its rows


@dataclass(frozen=True, order=True)
class PhotoFile:
    path: str       # relative to the photo folder
    size: int       # bytes
    mtime_ns: int   # st_mtime_ns


def list_photo_files(root: Path) -> list[PhotoFile]:
    """Image files under `root`, recursively, in sorted path order (an index's row order), with the
    size and mtime_ns they have now (symbolic links: of their targets)."""
    files = []
    images = (p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for path in sorted(images):
        try:
            stat = path.stat()
        except FileNotFoundError:  # deleted since the folder was listed
            continue
        files.append(PhotoFile(str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return files


@dataclass(frozen=True)
class IndexUpdate:
    """What a build did to the index it found: the photos now in it were `added` (not in it before),
    `changed` (in it, but their size or mtime_ns differ: embedded again) or `kept` (re-used as they
    were); `dropped` rows are gone (deleted, or now unreadable). `resumed` of the added and changed
    came from the parts of an interrupted build; `embedded_by_rank` is what each process embedded
    in this run. Without a usable earlier index, `started_over` says why and every photo is added."""

    added: int = 0
    dropped: int = 0
    changed: int = 0
    kept: int = 0
    resumed: int = 0
    embedded_by_rank: tuple[int, ...] = (0,)
    started_over: str | None = None

    def describe(self) -> str:
        return (f"{self.added + self.changed + self.kept} photos: {self.added} added, {self.dropped} "
                f"dropped, {self.changed} changed, {self.kept} kept (re-used)")

    def to_dict(self) -> dict[str, Any]:
        return {"added": self.added, "dropped": self.dropped, "changed": self.changed, "kept": self.kept,
                "resumed": self.resumed, "embedded_by_rank": list(self.embedded_by_rank),
                "started_over": self.started_over}


def compare_rows(previous: dict[str, tuple[int, int]], rows: list[PhotoFile]) -> tuple[int, int, int, int]:
    """(added, dropped, changed, kept): the index's new `rows` against the `previous` index's
    path -> (size, mtime_ns)."""
    added = changed = kept = 0
    for row in rows:
        before = previous.get(row.path)
        if before is None:
            added += 1
        elif before == (row.size, row.mtime_ns):
            kept += 1
        else:
            changed += 1
    dropped = len(previous.keys() - {row.path for row in rows})
    return added, dropped, changed, kept


@dataclass
class KnownPhotos:
    """Embeddings and unreadable verdicts computed before, each for a file at one size and mtime_ns:
    valid only while the file still has both."""

    dim: int
    sources: list[np.ndarray] = field(default_factory=list)                 # each (rows, dim) float32
    rows: dict[PhotoFile, tuple[int, int]] = field(default_factory=dict)    # file -> (source, row)
    unreadable: dict[PhotoFile, str] = field(default_factory=dict)          # file -> why
    origin: dict[PhotoFile, str] = field(default_factory=dict)              # file -> run that embedded it

    def add(self, vectors: np.ndarray, files: list[PhotoFile], unreadable: list[tuple[PhotoFile, str]],
            origin: str) -> None:
        if vectors.shape != (len(files), self.dim):
            raise ValueError(f"{len(files)} rows of {self.dim}-d embeddings expected, got {vectors.shape}")
        source = len(self.sources)
        self.sources.append(vectors)
        for row, file in enumerate(files):
            self.rows[file] = (source, row)
            self.origin[file] = origin
        for file, reason in unreadable:
            self.unreadable[file] = reason
            self.origin[file] = origin

    def has(self, file: PhotoFile) -> bool:
        """An embedding or an unreadable verdict for the file as it is now."""
        return file in self.rows or file in self.unreadable

    def collect(self, files: list[PhotoFile]
                ) -> tuple[list[PhotoFile], np.ndarray, list[tuple[PhotoFile, str]]]:
        """(rows, embeddings (len(rows), dim), unreadable) for `files`, every one of which `has`, in
        their order."""
        rows, unreadable, where = [], [], []
        for file in files:
            if file in self.rows:
                rows.append(file)
                where.append(self.rows[file])
            elif file in self.unreadable:
                unreadable.append((file, self.unreadable[file]))
            else:
                raise KeyError(f"{file.path}: not embedded at size {file.size}, mtime_ns {file.mtime_ns}")
        out = np.empty((len(rows), self.dim), np.float32)
        if rows:
            where_array = np.asarray(where, dtype=np.int64)  # (rows, 2): source, row
            for source, vectors in enumerate(self.sources):  # one fancy-indexed copy per source
                take = np.flatnonzero(where_array[:, 0] == source)
                if len(take):
                    out[take] = vectors[where_array[take, 1]]
        return rows, out, unreadable


# -- files on disk -----------------------------------------------------------------------------------

def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename over `path`: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_array(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would add ".npy" to a name without it
            np.save(handle, array)

    replace_atomically(path, write)


def save_json(path: Path, value: Any, indent: int | None = None) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=indent), encoding="utf-8"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def previous_build(out_dir: Path, meta: dict[str, Any] | None, spec: dict[str, Any], photo_root: Path,
                   dim: int) -> tuple[KnownPhotos, dict[str, tuple[int, int]], str | None]:
    """What the last finished build in `out_dir` knows, its rows' path -> (size, mtime_ns), and None;
    or nothing and the reason it cannot be re-used (another embedder or photo folder, an older format,
    files that do not match)."""
    known = KnownPhotos(dim)
    if meta is None:
        return known, {}, None
    if meta.get("embedder") != spec:
        return known, {}, f"built with another embedder ({meta.get('embedder')}, now {spec})"
    if meta.get("photo_root") != str(photo_root):
        return known, {}, f"built from another photo folder ({meta.get('photo_root')}, now {photo_root})"
    if meta.get("format") != FORMAT:
        return known, {}, "built by an earlier cliptune, which kept no per-photo embeddings"
    path = out_dir / EMBEDDINGS_FILE
    if not path.is_file() or file_sha256(path) != meta.get("embeddings_sha256"):
        return known, {}, f"{EMBEDDINGS_FILE} is missing or is not the one meta.json was written with"
    vectors = np.load(path, mmap_mode="r")
    files = [PhotoFile(p, s, m) for p, s, m in zip(meta["paths"], meta["sizes"], meta["mtimes_ns"])]
    if vectors.shape != (len(files), dim):
        return known, {}, f"{EMBEDDINGS_FILE} holds {vectors.shape}, meta.json {len(files)} {dim}-d rows"
    unreadable = [(PhotoFile(item["path"], item["size"], item["mtime_ns"]), item["reason"])
                  for item in meta.get("skipped", []) if "mtime_ns" in item]
    known.add(vectors, files, unreadable, origin="previous")
    return known, {f.path: (f.size, f.mtime_ns) for f in files}, None


def part_key(files: list[PhotoFile]) -> str:
    """A name for the shard of these files as they are now: the same on every rank."""
    digest = hashlib.sha256("\n".join(f"{f.path}\0{f.size}\0{f.mtime_ns}" for f in files).encode())
    return digest.hexdigest()[:20]


def write_part(parts: Path, key: str, files: list[PhotoFile], vectors: np.ndarray,
               unreadable: list[tuple[PhotoFile, str]], spec: dict[str, Any], run: str, rank: int) -> None:
    """One finished shard: its embeddings, then (last, so that it counts only once complete) its rows."""
    save_array(parts / f"part-{key}.npy", np.ascontiguousarray(vectors, dtype=np.float32))
    record = {"embedder": spec, "run": run, "rank": rank,
              "rows": [[f.path, f.size, f.mtime_ns] for f in files],
              "unreadable": [[f.path, f.size, f.mtime_ns, reason] for f, reason in unreadable]}
    save_json(parts / f"part-{key}.json", record)


def read_parts(parts: Path, known: KnownPhotos, spec: dict[str, Any], seen: set[str]) -> dict[str, list[int]]:
    """Add every complete part of `spec`'s embedder not in `seen` (the names of parts read before; updated)
    to `known`; returns run -> photos embedded by each rank, over the parts read now."""
    by_run: dict[str, list[int]] = {}
    for record_path in sorted(parts.glob("part-*.json")) if parts.is_dir() else []:
        if record_path.name in seen:
            continue
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if record.get("embedder") != spec:
                continue  # another embedder's: removed with parts/ once this build finishes
            files = [PhotoFile(*row) for row in record["rows"]]
            unreadable = [(PhotoFile(*item[:3]), item[3]) for item in record["unreadable"]]
            known.add(np.load(record_path.with_suffix(".npy")), files, unreadable, origin=record["run"])
        except (OSError, ValueError, EOFError, KeyError, TypeError) as err:
            # Its photos are embedded again, into a part of the same name when they make the same shard.
            log.warning("%s: ignored (%s)", record_path, err)
            record_path.unlink(missing_ok=True)
            continue
        # Only parts that were read: one that was not (damaged, another embedder's) may be written
        # again under its name by this build, and must then be read again.
        seen.add(record_path.name)
        counts = by_run.setdefault(record["run"], [])
        counts.extend([0] * (record["rank"] + 1 - len(counts)))
        counts[record["rank"]] += len(files) + len(unreadable)
    return by_run
