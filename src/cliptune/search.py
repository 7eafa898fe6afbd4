"""Photo search: embed a folder once into a FAISS index, then query it with a sentence or an image.

Two embedders behind one interface (`Embedder`): `TorchEmbedder` runs a base model, base + adapter,
or a merged export folder through `load_model`; `OnnxEmbedder` runs an ONNX export folder with
onnxruntime and never imports torch, so a search service needs neither torch nor peft.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cliptune.config import UsageError
from cliptune.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, ResizeRule, normalize_array, open_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
# What `cliptune.export` writes (defined here so that reading an export never imports torch).
ONNX_DIR = "onnx"
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
PREPROCESSING_FILE = "preprocessing.json"


# Both embedders decode through cliptune.images (torch-free at import), so an index's embeddings
# do not depend on the backend.


def pixel_batch(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float],
                rule: ResizeRule | None = None, rescale_factor: float = 1 / 255) -> np.ndarray:
    """RGB images -> float32 (B, 3, size, size), bit-identical to the model's image processor
    (its resize `rule`, default CLIP's; rescale and mean/std), as training and evaluation feed the model."""
    rule = rule or ResizeRule()
    arrays = np.stack([np.asarray(rule.apply(im, size), dtype=np.uint8) for im in images])  # (B, H, W, 3)
    return normalize_array(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)), mean, std, rescale_factor)


def _as_images(images: Sequence[Path | str | Image.Image]) -> list[Image.Image]:
    # Decoded in full (no JPEG draft), so a photo embeds exactly as evaluation embeds it.
    return [im if isinstance(im, Image.Image) else open_rgb(Path(im), MAX_PIXELS) for im in images]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- embedders --------------------------------------------------------------------------------------

class Embedder(Protocol):
    spec: dict[str, Any]   # enough to load the same embedder again (`load_embedder`)
    dim: int
    image_size: int

    def embed_images(self, images: Sequence[Path | str | Image.Image]) -> np.ndarray:
        """(B, D) float32, L2-normalised. Paths are decoded with `open_rgb` (ImageError if unreadable)."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(B, D) float32, L2-normalised."""


class TorchEmbedder:
    """A base model, base + adapter, or merged export folder, run with PyTorch."""

    def __init__(self, model: str, adapter: str | Path | None = None, device: str = "auto", batch_size: int = 32):
        import torch

        from cliptune.export import load_merged_model
        from cliptune.runtime import resolve_device

        _check_batch_size(batch_size)
        self._torch = torch
        self.device = resolve_device(device)
        self.model, self.preprocessing = load_merged_model(model, Path(adapter) if adapter else None)
        self.model.to(self.device)
        self.batch_size = batch_size
        self.image_size = self.preprocessing.image_size
        self.spec = {"kind": "torch", "model": str(Path(model).resolve()) if Path(model).exists() else model,
                     "adapter": str(Path(adapter).resolve()) if adapter else None}
        self.dim = int(self.embed_texts(["a"]).shape[1])

    def embed_images(self, images):
        p = self.preprocessing
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = pixel_batch(_as_images(images[start:start + self.batch_size]),
                                p.image_size, p.image_mean, p.image_std, p.resize_rule, p.rescale_factor)
            with self._torch.no_grad():
                features = self.model.encode_images(self._torch.from_numpy(batch).to(self.device))
            out.append(features.float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.empty((0, 0), np.float32)

    def embed_texts(self, texts):
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.preprocessing.tokenize(list(texts[start:start + self.batch_size]))
            with self._torch.no_grad():
                features = self.model.encode_texts(tokens["input_ids"].to(self.device),
                                                   tokens["attention_mask"].to(self.device))
            out.append(features.float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.empty((0, 0), np.float32)


class OnnxEmbedder:
    """An ONNX export folder (`cliptune export --onnx`), run with onnxruntime; torch is never imported."""

    def __init__(self, onnx_dir: str | Path, quantized: bool = False, batch_size: int = 32, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        _check_batch_size(batch_size)
        folder = Path(onnx_dir)
        if not (folder / PREPROCESSING_FILE).is_file() and (folder / ONNX_DIR / PREPROCESSING_FILE).is_file():
            folder = folder / ONNX_DIR  # the export folder itself was given
        if not (folder / PREPROCESSING_FILE).is_file():
            raise FileNotFoundError(f"{onnx_dir}: no {PREPROCESSING_FILE}; export with `cliptune export --onnx`")
        self.settings = json.loads((folder / PREPROCESSING_FILE).read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        suffix = ".int8.onnx" if quantized else ".onnx"
        names = {"image": IMAGE_ONNX.replace(".onnx", suffix), "text": TEXT_ONNX.replace(".onnx", suffix)}
        for name in names.values():
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing" + (" (export with --quantize)" if quantized else ""))
        providers = ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(str(folder / names["image"]), options, providers=providers)
        self.text_session = ort.InferenceSession(str(folder / names["text"]), options, providers=providers)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        max_length = int(self.settings["max_text_length"])
        self.tokenizer.enable_truncation(max_length)
        pad = {"pad_id": int(self.settings["pad_token_id"]), "pad_token": self.settings.get("pad_token") or "[PAD]"}
        self.tokenizer.enable_padding(length=max_length if self.settings["pad_to_max_length"] else None, **pad)
        self.batch_size = batch_size
        self.image_size = int(self.settings["image_size"])
        self.dim = int(self.settings["embedding_dim"])
        self.spec = {"kind": "onnx", "dir": str(folder.resolve()), "quantized": quantized}

    def embed_images(self, images):
        s = self.settings
        out = []
        for start in range(0, len(images), self.batch_size):
            # Exports from before exact preprocessing lack "resize" / "rescale_factor": CLIP's defaults.
            batch = pixel_batch(_as_images(images[start:start + self.batch_size]), self.image_size, s["mean"],
                                s["std"], ResizeRule.from_dict(s.get("resize", {})), s.get("rescale_factor", 1 / 255))
            out.append(self.image_session.run(None, {"pixel_values": batch})[0])
        return _normalise(np.concatenate(out)) if out else np.empty((0, self.dim), np.float32)

    def embed_texts(self, texts):
        out = []
        for start in range(0, len(texts), self.batch_size):
            encodings = self.tokenizer.encode_batch(list(texts[start:start + self.batch_size]))
            input_ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
            attention_mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
            out.append(self.text_session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0])
        return _normalise(np.concatenate(out)) if out else np.empty((0, self.dim), np.float32)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"train.eval_batch_size: {batch_size!r} must be an integer >= 1")


def load_embedder(spec: dict[str, Any], batch_size: int = 32) -> Embedder:
    """The embedder an index was built with, from its `meta.json` spec."""
    if spec["kind"] == "onnx":
        return OnnxEmbedder(spec["dir"], quantized=spec.get("quantized", False), batch_size=batch_size)
    if spec["kind"] == "torch":
        return TorchEmbedder(spec["model"], spec.get("adapter"), batch_size=batch_size)
    raise ValueError(f"unknown embedder kind {spec['kind']!r} (expected 'torch' or 'onnx')")


# -- the index ---------------------------------------------------------------------------------------

def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a stable order (shards depend on it)."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _faiss_index(embeddings: np.ndarray, approximate: str | None):
    import faiss

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
        files = list_images(photos)
        if not files:
            raise UsageError(f"{photos}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or its sub-folders")
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
                    images.append(open_rgb(path, MAX_PIXELS))  # full decode: the processor's exact pixels
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
        import faiss

        faiss.write_index(index, str(out_dir / INDEX_FILE))
        meta = {"photo_root": str(photos), "paths": paths, "embedder": embedder.spec, "dim": int(embeddings.shape[1]),
                "count": len(paths), "approximate": approximate, "nprobe": getattr(index, "nprobe", None),
                "skipped": [{"path": p, "reason": r} for p, r in skipped]}
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return cls(out_dir, photos, paths, meta, index, embedder)

    @classmethod
    def load(cls, root: Path, embedder: Embedder | None = None) -> Index:
        """Open an index; its embedder is loaded from meta.json on the first search unless given."""
        import faiss

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
    if Path(text).suffix.lower() in IMAGE_EXTENSIONS or has_separator:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"image query {text}: no such file")
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UsageError(f"image query {text}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        return path
    return text


def time_search(index: Index, queries: Sequence[str], k: int = 5) -> float:
    """Mean seconds per query (embedding + FAISS search), after one warm-up query."""
    index.search(queries[0], k)
    start = time.perf_counter()
    for query in queries:
        index.search(query, k)
    return (time.perf_counter() - start) / len(queries)
