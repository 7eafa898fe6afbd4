"""Embedders for search: one interface (`Embedder`) over two backends.

`TorchEmbedder` runs a base model, base + adapter, or a merged export folder through evaluation's
own encoding (`cliptune.evaluation.embedding`), so a photo embeds for search exactly as it does for
R@K; `OnnxEmbedder` runs an ONNX export folder with onnxruntime and never imports torch, so a search
service needs neither torch nor peft. Both decode through cliptune.data.images (torch-free at import)
with the model's own preprocessing, so an index's embeddings do not depend on the backend.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS, UsageError
from cliptune.data.images import ResizeRule, normalize_array, open_rgb
from cliptune.extras import require

log = logging.getLogger(__name__)

# What `cliptune.deploy.export` writes (defined here so that reading an export never imports torch).
ONNX_DIR = "onnx"
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
PREPROCESSING_FILE = "preprocessing.json"


def pixel_batch(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float],
                rule: ResizeRule | None = None, rescale_factor: float = 1 / 255) -> np.ndarray:
    """RGB images -> float32 (B, 3, size, size), bit-identical to the model's image processor
    (its resize `rule`, default CLIP's; rescale and mean/std), as training and evaluation feed the model."""
    rule = rule or ResizeRule()
    arrays = np.stack([np.asarray(rule.apply(im, size), dtype=np.uint8) for im in images])  # (B, H, W, 3)
    return normalize_array(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)), mean, std, rescale_factor)


def _as_images(images: Sequence[Path | str | Image.Image]) -> list[Image.Image]:
    # Decoded in full (no JPEG draft), so a photo embeds exactly as evaluation embeds it.
    return [im if isinstance(im, Image.Image) else open_rgb(Path(im), DEFAULT_MAX_IMAGE_PIXELS) for im in images]


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
        from cliptune.models.lora import load_merged_model
        from cliptune.runtime import resolve_device

        _check_batch_size(batch_size)
        self.device = resolve_device(device)
        self.model, self.preprocessing = load_merged_model(model, Path(adapter) if adapter else None)
        self.model.to(self.device)
        self.batch_size = batch_size
        self.image_size = self.preprocessing.image_size
        self.spec = {"kind": "torch", "model": str(Path(model).resolve()) if Path(model).exists() else model,
                     "adapter": str(Path(adapter).resolve()) if adapter else None}
        self.dim = int(self.embed_texts(["a"]).shape[1])

    def embed_images(self, images):
        from cliptune.evaluation.embedding import embed_images

        # fp32, as the ONNX export runs: an index must not depend on the machine's autocast.
        return embed_images(self.model, list(images), self.preprocessing, self.device, self.batch_size,
                            progress=False).numpy()

    def embed_texts(self, texts):
        from cliptune.evaluation.embedding import embed_texts

        return embed_texts(self.model, list(texts), self.preprocessing, self.device, self.batch_size,
                           progress=False).numpy()


class OnnxEmbedder:
    """An ONNX export folder (`cliptune export --onnx`), run with onnxruntime; torch is never imported."""

    def __init__(self, onnx_dir: str | Path, quantized: bool = False, batch_size: int = 32, threads: int | None = None):
        ort = require("onnxruntime", "search")
        tokenizers = require("tokenizers", "search")

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
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
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
