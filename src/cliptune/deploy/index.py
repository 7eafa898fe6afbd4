"""Photo search: embed a folder once into a FAISS index, then query it with a sentence or an image.

The embedders (`cliptune.deploy.embedders`: torch or onnxruntime) turn photos and queries into
vectors; this module keeps the vectors in FAISS and answers queries.

Index folder:
    index.faiss   inner product over L2-normalised float32 (cosine); flat, HNSW or IVF
    meta.json     photo root and relative paths (row order), embedder spec, dims, skipped files + reasons
    parts/        resumable build: one .npy (+ .json of kept/skipped paths) per shard of images, done.txt
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS, UsageError
from cliptune.data.images import IMAGE_SUFFIXES, ImageError, open_rgb
from cliptune.deploy.embedders import Embedder, load_embedder
from cliptune.extras import require

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
# -- the index ---------------------------------------------------------------------------------------

def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a stable order (shards depend on it)."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _faiss_index(embeddings: np.ndarray, approximate: str | None):
    faiss = require("faiss", "search")

    n, dim = embeddings.shape
    if approximate is None:
        index = faiss.IndexFlatIP(dim)
    elif approximate == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
    elif approximate == "ivf":
        # ~sqrt(n) lists, with at least 39 training points per list as faiss asks.
        nlist = max(1, min(int(math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = min(nlist, 8)
    else:
        raise ValueError(f"approximate: {approximate!r} is not one of hnsw, ivf")
    index.add(embeddings)
    return index


@dataclass
class Index:
    root: Path                       # the index folder
    photo_root: Path
    paths: list[str]                 # relative to photo_root, one per row of the FAISS index
    meta: dict[str, Any]
    faiss_index: Any
    embedder: Embedder | None = field(default=None, repr=False)

    @classmethod
    def build(cls, photos: Path, out_dir: Path, embedder: Embedder, approximate: str | None = None,
              shard_size: int = 256, progress: bool = True, max_shards: int | None = None) -> Index:
        """Embed every image under `photos` into `out_dir`. Shards already done (an interrupted build
        with the same embedder and file list) are reused. `max_shards` stops early (for tests/benchmarks)."""
        from tqdm.auto import tqdm

        photos, out_dir = Path(photos).expanduser().resolve(), Path(out_dir)
        if not photos.is_dir():
            raise UsageError(f"{photos}: no such folder of photos")
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise UsageError(f"shard_size: {shard_size!r} must be an integer >= 1")
        if approximate not in (None, "hnsw", "ivf"):
            raise UsageError(f"approximate: {approximate!r} is not one of hnsw, ivf")
        require("faiss", "search")  # before minutes of embedding, not after
        files = list_images(photos)
        if not files:
            raise UsageError(f"{photos}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or its sub-folders")
        rel = [str(p.relative_to(photos)) for p in files]
        created = not out_dir.exists()
        parts = out_dir / "parts"
        plan = {"photo_root": str(photos), "files": rel, "embedder": embedder.spec, "shard_size": shard_size}
        plan_file = parts / "plan.json"
        if plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) != plan:
            log.warning("%s: photos, embedder or shard size changed since the last build; starting over", out_dir)
            shutil.rmtree(parts)
        parts.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps(plan), encoding="utf-8")
        done_file = parts / "done.txt"
        done = set(done_file.read_text(encoding="utf-8").split()) if done_file.is_file() else set()
        n_shards = math.ceil(len(files) / shard_size)
        bar = tqdm(total=len(files), desc="indexing photos", disable=not progress, unit="img")
        built = 0
        for shard in range(n_shards):
            name = f"{shard:05d}"
            chunk = files[shard * shard_size:(shard + 1) * shard_size]
            if name in done:
                bar.update(len(chunk))
                continue
            if max_shards is not None and built >= max_shards:
                bar.close()
                raise InterruptedError(f"stopped after {built} new shard(s); run again to resume")
            images, kept, skipped = [], [], []
            for path in chunk:
                try:
                    images.append(open_rgb(path, DEFAULT_MAX_IMAGE_PIXELS))  # full decode: the processor's exact pixels
                    kept.append(str(path.relative_to(photos)))
                except ImageError as err:
                    skipped.append([str(path.relative_to(photos)), str(err)])
                bar.update(1)
            embeddings = embedder.embed_images(images) if images else np.empty((0, embedder.dim), np.float32)
            np.save(parts / f"{name}.npy", embeddings.astype(np.float32))
            (parts / f"{name}.json").write_text(json.dumps({"kept": kept, "skipped": skipped}), encoding="utf-8")
            with open(done_file, "a", encoding="utf-8") as handle:  # written last: a shard counts once complete
                handle.write(name + "\n")
            built += 1
        bar.close()
        chunks, paths, skipped = [], [], []
        for shard in range(n_shards):
            name = f"{shard:05d}"
            chunks.append(np.load(parts / f"{name}.npy"))
            record = json.loads((parts / f"{name}.json").read_text(encoding="utf-8"))
            paths += record["kept"]
            skipped += record["skipped"]
        embeddings = np.concatenate(chunks) if chunks else np.empty((0, embedder.dim), np.float32)
        if len(paths) == 0:
            # Shards of nothing are no start to resume from: leave no half-built index behind.
            shutil.rmtree(out_dir if created else parts)
            raise UsageError(f"{photos}: no readable images ({len(skipped)} unreadable, e.g. {skipped[0][0]}: "
                             f"{skipped[0][1]})")
        index = _faiss_index(np.ascontiguousarray(embeddings, dtype=np.float32), approximate)
        faiss = require("faiss", "search")

        faiss.write_index(index, str(out_dir / INDEX_FILE))
        meta = {"photo_root": str(photos), "paths": paths, "embedder": embedder.spec, "dim": int(embeddings.shape[1]),
                "count": len(paths), "approximate": approximate, "nprobe": getattr(index, "nprobe", None),
                "skipped": [{"path": p, "reason": r} for p, r in skipped]}
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return cls(out_dir, photos, paths, meta, index, embedder)

    @classmethod
    def load(cls, root: Path, embedder: Embedder | None = None) -> Index:
        """Open an index; its embedder is loaded from meta.json on the first search unless given."""
        faiss = require("faiss", "search")

        root = Path(root)
        if not (root / META_FILE).is_file():
            raise FileNotFoundError(f"{root}: not an index (no {META_FILE}); build one with `cliptune index`")
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(root / INDEX_FILE))
        if meta.get("nprobe"):
            index.nprobe = meta["nprobe"]
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
