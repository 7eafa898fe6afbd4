"""Validation of a model in training: retrieval metrics and the loss on the val split, from one
embedding pass (zero-shot before training, every `train.eval_every` steps, fine-tuned at the end)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from cliptune.config import RunConfig
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import ImageCaptions
from cliptune.evaluation.embedding import SplitEmbeddings, embed_split, embed_split_sharded, score_embeddings
from cliptune.models.contrastive import ContrastiveModel
from cliptune.training.accumulation import BatchLoss


@torch.no_grad()
def validate(model: ContrastiveModel, records: list[ImageCaptions], preprocessing: Preprocessing, loss: BatchLoss,
             config: RunConfig, device: torch.device, precision: str, rank: int = 0, world_size: int = 1,
             image_source=None) -> tuple[dict[str, float], SplitEmbeddings]:
    """Retrieval metrics and `val_loss` on `records`, and the embeddings they came from.

    Under several processes every rank must call it: each encodes its share of the split and the
    embeddings are all-gathered, so every rank returns the same metrics for the whole split.
    """
    if world_size > 1 and len(records) >= world_size:
        embeddings = embed_split_sharded(model, records, preprocessing, device, rank, world_size,
                                         config.train.eval_batch_size, config.data.max_image_pixels, precision,
                                         image_source=image_source)
    else:  # one process, or fewer images than processes: every rank encodes the whole (small) split
        embeddings = embed_split(model, records, preprocessing, device, config.train.eval_batch_size, 0,
                                 config.data.max_image_pixels, precision, image_source=image_source, progress=False)
    metrics = score_embeddings(embeddings)
    metrics["val_loss"] = validation_loss(embeddings, loss, config.train.effective_batch_size, device)
    return metrics, embeddings


@torch.no_grad()
def validation_loss(embeddings: SplitEmbeddings, loss: BatchLoss, batch_size: int, device: torch.device) -> float:
    """Loss over consecutive batches of `batch_size` images, each image with its first caption.

    A contrastive loss depends on the batch size, so it is only comparable within one config.
    """
    first = torch.zeros(len(embeddings.image_emb), dtype=torch.long)
    seen = torch.zeros(len(embeddings.image_emb), dtype=torch.bool)
    for text_index, image_index in enumerate(embeddings.text_image_index.tolist()):
        if not seen[image_index]:
            first[image_index], seen[image_index] = text_index, True
    text = embeddings.text_emb[first]
    losses = []
    for start in range(0, len(text), batch_size):
        image_chunk = embeddings.image_emb[start: start + batch_size].to(device)
        text_chunk = text[start: start + batch_size].to(device)
        ids = torch.arange(len(image_chunk), device=device)
        losses.append(float(loss(image_chunk, text_chunk, ids)))
    return sum(losses) / len(losses)


def zero_shot_metrics(path: Path, evaluate: Callable[[], tuple[dict[str, float], SplitEmbeddings]],
                      accelerator: Accelerator) -> dict[str, float] | None:
    """The model's metrics before training, measured once per run folder: `evaluate()` writes them to
    `path`, a resumed run reads them back (on rank 0, which returns them; other ranks then get None)."""
    # Rank 0 decides (the file may live on its disk only); every rank then joins the evaluation.
    done = [path.is_file() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(done)
    if done[0]:
        return json.loads(path.read_text(encoding="utf-8")) if accelerator.is_main_process else None
    metrics, _ = evaluate()
    if accelerator.is_main_process:
        path.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics
