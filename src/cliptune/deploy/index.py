"""Photo search: embed a folder into a FAISS index that stays current, then query it with a sentence
or an image.

The embedders (`cliptune.deploy.embedders`: torch or onnxruntime) turn photos and queries into
vectors; `catalog` remembers which photo (path, size, mtime_ns) has which vector, so that building
into the same folder again embeds only new and changed photos; `vector_index` builds the exact or
approximate FAISS index over them. This module runs a build (in one process or in every process of
a `torchrun` / `accelerate launch` job) and answers queries.

Index folder:
    embeddings.npy  (N, D) float32, L2-normalised: row i is the photo paths[i]
    index.faiss     inner product over those rows (cosine); flat, IVF or HNSW
    meta.json       photo root; paths (row order) with their sizes and mtimes_ns; embedder spec, dim;
                    the FAISS settings; unreadable files with their reasons; what the last build did
    parts/          a build in progress: shards embedded so far (gone once the build finishes)

A build writes embeddings.npy, then index.faiss, then meta.json, each to a temporary file renamed
over the old one: a reader that sees a new meta.json (its st_mtime_ns or st_size changed) finds the
index.faiss written with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS, UsageError
from cliptune.data.images import IMAGE_SUFFIXES, ImageError, open_rgb
from cliptune.deploy import catalog
from cliptune.deploy.catalog import IndexUpdate, PhotoFile
from cliptune.deploy.embedders import Embedder, load_embedder
from cliptune.deploy.vector_index import AnnSettings, apply_search_settings, build_faiss_index
from cliptune.extras import require

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"


# -- the processes of a build -------------------------------------------------------------------------

class Ranks(Protocol):
    """The processes that build one index together: each embeds a share, rank 0 writes the index."""

    rank: int
    world_size: int

    def share(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""

    def barrier(self) -> None:
        """Return once every rank has called it."""


class OneProcess:
    rank, world_size = 0, 1

    def share(self, value: Any) -> Any:
        return value

    def barrier(self) -> None:
        pass


def launched_world_size() -> int:
    """How many processes `torchrun` / `accelerate launch` started (WORLD_SIZE), 1 without a launcher."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={value!r}: expected the number of processes (torchrun sets it)") from None


@dataclass(frozen=True)
class _Plan:
    """What rank 0 decided, sent to every rank: the shards still to embed (shard i goes to rank
    i % world_size), and the run they are recorded under."""

    run: str
    shards: list[list[PhotoFile]]
    error: str | None = None


def _embed_shard(photos: Path, files: list[PhotoFile], embedder: Embedder, bar
                 ) -> tuple[list[PhotoFile], np.ndarray, list[tuple[PhotoFile, str]]]:
    images, kept, unreadable = [], [], []
    for file in files:
        try:
            # Decoded in full (no JPEG draft): the pixels the model's processor sees in evaluation.
            images.append(open_rgb(photos / file.path, DEFAULT_MAX_IMAGE_PIXELS))
            kept.append(file)
        except ImageError as err:
            unreadable.append((file, str(err)))
        bar.update(1)
    vectors = embedder.embed_images(images) if images else np.empty((0, embedder.dim), np.float32)
    return kept, np.asarray(vectors, dtype=np.float32), unreadable


def _read_meta(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # edited by hand: the index is built again rather than refused
        log.warning("%s: not JSON (%s); embedding every photo again", path, err)
        return None


def build_index(photos: Path, out_dir: Path, embedder: Embedder, ann: AnnSettings | None = None,
                shard_size: int = 256, progress: bool = True, max_shards: int | None = None,
                ranks: Ranks | None = None) -> Index | None:
    """Bring the index in `out_dir` up to date with the photos under `photos`; on rank 0 the Index,
    on the other ranks of a distributed build None (they only embed their share).

    Photos the index (or an interrupted build's parts) already holds at their current size and
    mtime_ns are re-used; new and changed ones are embedded in shards of `shard_size` that are saved
    as they finish, so an interrupted build resumes where it stopped. `max_shards`: stop with
    InterruptedError after that many new shards on a rank (tests and benchmarks)."""
    from tqdm.auto import tqdm

    ranks = ranks or OneProcess()
    ann = ann or AnnSettings()
    photos, out_dir = Path(photos).expanduser().resolve(), Path(out_dir)
    if not photos.is_dir():
        raise UsageError(f"{photos}: no such folder of photos")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UsageError(f"shard_size: {shard_size!r} must be an integer >= 1")
    require("faiss", "search")  # before minutes of embedding, not after
    parts = out_dir / catalog.PARTS_DIR
    created = not out_dir.exists()

    # 1. Rank 0 lists the photos and decides what to embed; every rank gets the same plan (listing on
    #    each rank could disagree with a photo added meanwhile, or with parts another rank just wrote).
    if ranks.rank == 0:
        files = catalog.list_photo_files(photos)
        known, previous, started_over = catalog.previous_build(out_dir, _read_meta(out_dir), embedder.spec,
                                                               photos, embedder.dim)
        if started_over:
            log.warning("%s: %s; embedding every photo again", out_dir, started_over)
        seen: set[str] = set()
        catalog.read_parts(parts, known, embedder.spec, seen)
        todo = [f for f in files if not known.has(f)]
        shards = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
        empty = f"{photos}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or its sub-folders"
        plan = _Plan(uuid.uuid4().hex[:12], shards, None if files else empty)
    else:
        plan = None
    plan = ranks.share(plan)
    if plan.error:
        raise UsageError(plan.error)

    # 2. Every rank embeds its shards, saving each as it finishes.
    mine = plan.shards[ranks.rank::ranks.world_size]
    bar = tqdm(total=sum(map(len, mine)), desc="indexing photos", unit="img",
               disable=not progress or ranks.rank != 0)
    stopped = False
    for count, shard in enumerate(mine):
        if max_shards is not None and count >= max_shards:
            stopped = True
            break
        parts.mkdir(parents=True, exist_ok=True)
        rows, vectors, unreadable = _embed_shard(photos, shard, embedder, bar)
        catalog.write_part(parts, catalog.part_key(shard), rows, vectors, unreadable, embedder.spec, plan.run,
                           ranks.rank)
    bar.close()
    ranks.barrier()
    if ranks.rank != 0:
        if stopped:
            raise InterruptedError(f"stopped after {max_shards} new shard(s); run again to resume")
        return None

    # 3. Rank 0 gathers every rank's parts and writes the index.
    by_run = catalog.read_parts(parts, known, embedder.spec, seen)  # the parts this run's ranks wrote
    missing = [f for f in files if not known.has(f)]
    if missing:
        raise InterruptedError(f"stopped with {len(missing)} photos not embedded yet; run again to resume")
    rows, embeddings, unreadable = known.collect(files)
    if not rows:
        # Parts of nothing but unreadable files are no start to resume from: leave no half-built index behind.
        shutil.rmtree(out_dir if created else parts, ignore_errors=True)
        first, reason = unreadable[0]
        raise UsageError(f"{photos}: no readable images ({len(unreadable)} unreadable, e.g. {first.path}: "
                         f"{reason})")
    added, dropped, changed, kept = catalog.compare_rows(previous, rows)
    embedded = by_run.get(plan.run, [0])
    update = IndexUpdate(added, dropped, changed, kept,
                         resumed=sum(known.origin[f] not in ("previous", plan.run) for f in rows),
                         embedded_by_rank=tuple(embedded + [0] * (ranks.world_size - len(embedded))),
                         started_over=started_over)
    index = build_faiss_index(embeddings, ann)
    faiss = require("faiss", "search")

    out_dir.mkdir(parents=True, exist_ok=True)
    catalog.save_array(out_dir / catalog.EMBEDDINGS_FILE, embeddings)
    catalog.replace_atomically(out_dir / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    meta = {"format": catalog.FORMAT, "photo_root": str(photos), "paths": [f.path for f in rows],
            "sizes": [f.size for f in rows], "mtimes_ns": [f.mtime_ns for f in rows],
            "embedder": embedder.spec, "dim": int(embeddings.shape[1]), "count": len(rows),
            "approximate": ann.kind, "nprobe": getattr(index, "nprobe", None),
            "nlist": getattr(index, "nlist", None), "ann": ann.to_dict(),
            "embeddings_sha256": catalog.file_sha256(out_dir / catalog.EMBEDDINGS_FILE),
            "update": update.to_dict(),
            "skipped": [{"path": f.path, "reason": reason, "size": f.size, "mtime_ns": f.mtime_ns}
                        for f, reason in unreadable]}
    catalog.save_json(out_dir / META_FILE, meta, indent=1)  # last: readers reload on a new meta.json
    shutil.rmtree(parts, ignore_errors=True)
    return Index(out_dir, photos, meta["paths"], meta, index, embedder, update)


@dataclass
class Index:
    root: Path                       # the index folder
    photo_root: Path
    paths: list[str]                 # relative to photo_root, one per row of the FAISS index
    meta: dict[str, Any]
    faiss_index: Any
    embedder: Embedder | None = field(default=None, repr=False)
    update: IndexUpdate | None = None  # what the build that made it did (None when loaded)

    @classmethod
    def build(cls, photos: Path, out_dir: Path, embedder: Embedder, approximate: str | None = None,
              shard_size: int = 256, progress: bool = True, max_shards: int | None = None,
              nprobe: int | None = None) -> Index:
        """Embed the images under `photos` into `out_dir`, in this process; an index already there is
        brought up to date (new and changed photos embedded, deleted ones dropped, the rest re-used)
        and an interrupted build resumes. `max_shards` stops early (tests/benchmarks)."""
        index = build_index(photos, out_dir, embedder, AnnSettings(approximate, nprobe=nprobe), shard_size,
                            progress, max_shards)
        assert index is not None  # one process is rank 0
        return index

    @classmethod
    def load(cls, root: Path, embedder: Embedder | None = None) -> Index:
        """Open an index; its embedder is loaded from meta.json on the first search unless given."""
        faiss = require("faiss", "search")

        root = Path(root)
        if not (root / META_FILE).is_file():
            raise FileNotFoundError(f"{root}: not an index (no {META_FILE}); build one with `cliptune index`")
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(root / INDEX_FILE))
        if index.ntotal != len(meta["paths"]):
            raise ValueError(f"{root}: {INDEX_FILE} holds {index.ntotal} photos, {META_FILE} lists "
                             f"{len(meta['paths'])}: a build is replacing them; load again")
        apply_search_settings(index, meta)
        return cls(root, Path(meta["photo_root"]), meta["paths"], meta, index, embedder)

    def embed_query(self, query: str | Path | Image.Image) -> np.ndarray:
        query = check_query(query)  # before loading the embedder: a bad query costs no model load
        if self.embedder is None:
            self.embedder = load_embedder(self.meta["embedder"])
        if isinstance(query, (Image.Image, Path)):
            return self.embedder.embed_images([query])
        return self.embedder.embed_texts([query])

    def search(self, query: str | Path | Image.Image, k: int = 5) -> list[tuple[str, float]]:
        """The k best photos for a sentence, an image file or a PIL image: (path, cosine), best first.
        Fewer than k when the index holds fewer photos."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UsageError(f"k: {k!r} must be an integer >= 1 (the number of results)")
        vector = self.embed_query(query)  # (1, D)
        scores, rows = self.faiss_index.search(np.ascontiguousarray(vector, dtype=np.float32), min(k, len(self.paths)))
        return [(str(self.photo_root / self.paths[r]), float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]


def check_query(query: str | Path | Image.Image) -> str | Path | Image.Image:
    """A sentence (str), an image file (Path) or a PIL image, refusing what would search for nonsense.

    A string that looks like a path (it ends in an image suffix, or has a path separator and no
    whitespace) is an image query, and must exist: a mistyped file name searched as a sentence
    would return confident nonsense.
    """
    if isinstance(query, Image.Image):
        return query
    if isinstance(query, Path):
        path = query.expanduser()
        if not path.is_file():
            raise UsageError(f"image query {query}: no such file")
        return path
    if not isinstance(query, str):
        raise UsageError(f"query: expected a sentence, an image path or a PIL image, got {type(query).__name__}")
    text = query.strip()
    if not text:
        raise UsageError("query is empty: give a sentence or the path of an image")
    has_separator = any(sep in text for sep in ("/", "\\")) and not any(c.isspace() for c in text)
    if Path(text).suffix.lower() in IMAGE_SUFFIXES or has_separator:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"image query {text}: no such file")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsageError(f"image query {text}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        return path
    return text
