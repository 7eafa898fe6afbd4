"""Embedding a split once and scoring it with the standard retrieval protocol.

Images and captions are encoded in batches without gradients; the (n_texts x n_images) similarity
is never built whole (`metrics.retrieval_metrics` works in chunks), so COCO 5K fits any machine.
`embed_images` / `embed_texts` are the one PyTorch encoding path: evaluation, training's report, the
bench and search's `TorchEmbedder` all call them, so a model embeds the same wherever it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS
from cliptune.data.batches import decode_pixels
from cliptune.data.images import ImageTransform
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import ImageCaptions, flatten_captions
from cliptune.distributed import gather_rows
from cliptune.evaluation.metrics import retrieval_metrics
from cliptune.models.contrastive import ContrastiveModel


@dataclass
class SplitEmbeddings:
    image_emb: torch.Tensor  # (n_images, D), L2-normalised, float32, CPU
    text_emb: torch.Tensor  # (n_texts, D), L2-normalised, float32, CPU
    text_image_index: torch.Tensor  # (n_texts,) long: the image of each caption
    texts: list[str]


ImageItem = ImageCaptions | Path | str | Image.Image  # a record's image, an image file, or a decoded image


class _Images(Dataset):
    def __init__(self, items: Sequence[ImageItem], transform: ImageTransform, max_pixels: int, image_source=None):
        self.items, self.transform, self.max_pixels, self.image_source = items, transform, max_pixels, image_source

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        if isinstance(item, Image.Image):  # decoded by the caller (search decodes once, skipping bad files)
            return self.transform(item)
        path = item.image_path if isinstance(item, ImageCaptions) else Path(item)
        return decode_pixels(path, self.transform, self.max_pixels, self.image_source)


def autocast_context(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def embed_images(model: ContrastiveModel, images: Sequence[ImageItem], preprocessing: Preprocessing,
                 device: torch.device, batch_size: int = 64, num_workers: int = 0, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 precision: str = "fp32", image_source=None, progress: bool = True) -> torch.Tensor:
    """(n_images, D) L2-normalised float32 embeddings, in order. Unreadable images raise ImageError:
    evaluation sets are checked first (`batches.scan_images`) so a metric never silently drops one."""
    dataset = _Images(images, preprocessing.image_transform(), max_pixels, image_source)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator())  # leaves the global RNG (dropout's) untouched
    model.eval()
    chunks = []
    for pixels in tqdm(loader, desc="embedding images", disable=not progress, leave=False):
        pixels = preprocessing.normalize(pixels.to(device, non_blocking=True))
        with autocast_context(device, precision):
            features = model.encode_images(pixels)
        chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


@torch.no_grad()
def embed_texts(model: ContrastiveModel, texts: Sequence[str], preprocessing: Preprocessing, device: torch.device,
                batch_size: int = 256, precision: str = "fp32", progress: bool = True) -> torch.Tensor:
    """(n_texts, D) L2-normalised float32 embeddings. Captions are sorted by length so each batch
    pads little, then returned in the original order."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding captions", disable=not progress, leave=False):
        index = order[start: start + batch_size]
        batch = preprocessing.tokenize([texts[i] for i in index])
        with autocast_context(device, precision):
            features = model.encode_texts(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        features = torch.nn.functional.normalize(features.float(), dim=-1).cpu()
        if out is None:
            out = torch.empty(len(texts), features.shape[1])
        out[index] = features
    return out if out is not None else torch.empty(0, 0)


def embed_split(model: ContrastiveModel, records: list[ImageCaptions], preprocessing: Preprocessing,
                device: torch.device, batch_size: int = 64, num_workers: int = 0, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                precision: str = "fp32", image_source=None, progress: bool = True) -> SplitEmbeddings:
    texts, index = flatten_captions(records)
    return SplitEmbeddings(
        image_emb=embed_images(model, records, preprocessing, device, batch_size, num_workers, max_pixels,
                               precision, image_source, progress),
        text_emb=embed_texts(model, texts, preprocessing, device, max(batch_size, 128), precision, progress),
        text_image_index=torch.tensor(index, dtype=torch.long),
        texts=texts,
    )


def embed_split_sharded(model: ContrastiveModel, records: list[ImageCaptions], preprocessing: Preprocessing,
                        device: torch.device, rank: int, world_size: int, batch_size: int = 64,
                        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, precision: str = "fp32", image_source=None) -> SplitEmbeddings:
    """`embed_split` across processes: each rank encodes a contiguous share of the images and of the
    captions, and `distributed.gather_rows` joins the shares in rank order, which is split order. Every rank
    returns the same, complete SplitEmbeddings. Each rank must hold at least one image."""
    texts, index = flatten_captions(records)

    def share(items: list) -> list:
        return items[len(items) * rank // world_size: len(items) * (rank + 1) // world_size]

    image_local = embed_images(model, share(records), preprocessing, device, batch_size, 0, max_pixels, precision,
                               image_source, progress=False)
    text_local = embed_texts(model, share(texts), preprocessing, device, max(batch_size, 128), precision,
                             progress=False)
    return SplitEmbeddings(image_emb=gather_rows(image_local.to(device)).cpu(),
                           text_emb=gather_rows(text_local.to(device)).cpu(),
                           text_image_index=torch.tensor(index, dtype=torch.long), texts=texts)


def score_embeddings(embeddings: SplitEmbeddings) -> dict[str, float]:
    return retrieval_metrics(embeddings.image_emb, embeddings.text_emb, embeddings.text_image_index)


def top_captions(embeddings: SplitEmbeddings, image_index: int, k: int = 5) -> list[tuple[int, float]]:
    """The k best captions for one image: (caption index, cosine)."""
    scores = embeddings.text_emb @ embeddings.image_emb[image_index]  # (n_texts,)
    values, indices = scores.topk(min(k, len(scores)))
    return [(int(i), float(v)) for i, v in zip(indices, values)]


__all__ = ["SplitEmbeddings", "embed_images", "embed_texts", "embed_split", "embed_split_sharded", "score_embeddings",
           "top_captions",
           "autocast_context"]
