"""Image-text retrieval metrics under the standard R@K protocol.

Every caption is scored against every image. image->text R@K counts an image as a hit when ANY of
its captions is among its top K texts; text->image R@K counts a caption as a hit when its one image
is among its top K images. The recall values agree exactly with LAION's CLIP_benchmark
(`clip_benchmark/metrics/zeroshot_retrieval.py`, `recall_at_k(...) > 0`), ties included: hits are
found with `torch.topk` called with the same k on the same score rows, so ties are broken the way
CLIP_benchmark breaks them.

The (n_images, n_texts) similarity matrix is never built whole: rows are scored `chunk_size` at a
time, so memory is O(chunk_size * max(n_images, n_texts)) and COCO 5K (5,000 x 25,000) or larger
fits a fixed budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

RECALL_KS: tuple[int, ...] = (1, 5, 10)

RECALL_KEYS: tuple[str, ...] = tuple(
    f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in RECALL_KS
)

METRIC_KEYS: tuple[str, ...] = (
    *RECALL_KEYS,
    "rsum",
    "image_to_text_median_rank",
    "image_to_text_mean_rank",
    "text_to_image_median_rank",
    "text_to_image_mean_rank",
    "mean_cosine_matched",
    "mean_cosine_unmatched",
    "cosine_gap",
)


@torch.no_grad()  # evaluation only: never build an autograd graph over n_images x n_texts scores
def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image_index: Tensor,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Score every caption against every image and return the metrics named in `METRIC_KEYS`.

    Args:
        image_emb: (n_images, D) L2-normalised image embeddings.
        text_emb: (n_texts, D) L2-normalised caption embeddings, on the same device.
        text_image_index: (n_texts,) integer tensor; `text_image_index[t]` is the row of
            `image_emb` that caption t describes. Every image needs at least one caption.
        chunk_size: rows of the similarity matrix scored at once (memory knob only; the result
            does not depend on it beyond float rounding of the dot products).

    Returns:
        Recalls in percent (0..100), `rsum` (sum of the six recalls), median and mean ranks
        (1-based; image->text uses the best-ranked true caption), the mean cosine of matching and of
        non-matching pairs, and `cosine_gap` (matched - unmatched). `mean_cosine_unmatched` is NaN
        when there is a single image (no non-matching pair exists).

    Ranks are `1 + number of candidates scoring strictly higher than the true one`, so a tie
    counts in the item's favour; recalls follow `torch.topk`'s tie order instead (CLIP_benchmark
    compatible), so under exact ties `rank <= K` and a R@K hit can disagree. With fewer than K
    candidates, K is clipped to their number (CLIP_benchmark would raise instead).
    """
    text_image_index = _validate(image_emb, text_emb, text_image_index, chunk_size)
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]

    i2t_hits = {k: 0 for k in RECALL_KS}
    i2t_ranks: list[Tensor] = []
    for start in range(0, n_images, chunk_size):
        image_ids = torch.arange(start, min(start + chunk_size, n_images), device=image_emb.device)
        scores = image_emb[image_ids] @ text_emb.T  # (chunk, n_texts)
        is_true = text_image_index[None, :] == image_ids[:, None]  # (chunk, n_texts)
        for k in RECALL_KS:
            # One topk call per k, as CLIP_benchmark does: topk(10)[:5] may break ties
            # differently from topk(5).
            top = scores.topk(min(k, n_texts), dim=1).indices  # (chunk, k)
            i2t_hits[k] += int((text_image_index[top] == image_ids[:, None]).any(dim=1).sum())
        best_true = scores.masked_fill(~is_true, float("-inf")).amax(dim=1)  # (chunk,)
        i2t_ranks.append(1 + (scores > best_true[:, None]).sum(dim=1))

    t2i_hits = {k: 0 for k in RECALL_KS}
    t2i_ranks: list[Tensor] = []
    for start in range(0, n_texts, chunk_size):
        stop = min(start + chunk_size, n_texts)
        scores = text_emb[start:stop] @ image_emb.T  # (chunk, n_images)
        true_image = text_image_index[start:stop]  # (chunk,)
        for k in RECALL_KS:
            top = scores.topk(min(k, n_images), dim=1).indices  # (chunk, k)
            t2i_hits[k] += int((top == true_image[:, None]).any(dim=1).sum())
        true_score = scores.gather(1, true_image[:, None])  # (chunk, 1)
        t2i_ranks.append(1 + (scores > true_score).sum(dim=1))

    metrics: dict[str, float] = {}
    for k in RECALL_KS:
        metrics[f"image_to_text_R@{k}"] = 100.0 * i2t_hits[k] / n_images
    for k in RECALL_KS:
        metrics[f"text_to_image_R@{k}"] = 100.0 * t2i_hits[k] / n_texts
    metrics["rsum"] = sum(metrics[key] for key in RECALL_KEYS)
    metrics.update(_rank_summary("image_to_text", torch.cat(i2t_ranks)))
    metrics.update(_rank_summary("text_to_image", torch.cat(t2i_ranks)))
    metrics.update(_cosine_summary(image_emb, text_emb, text_image_index))
    return {key: metrics[key] for key in METRIC_KEYS}


def _validate(image_emb: Tensor, text_emb: Tensor, text_image_index: Tensor, chunk_size: int) -> Tensor:
    """Reject inputs that would silently give wrong numbers; return the index on the right device."""
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"image_emb and text_emb must be 2-D, got shapes {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embedding widths differ: image_emb has D={image_emb.shape[1]}, "
            f"text_emb has D={text_emb.shape[1]}"
        )
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("need at least one image and one caption")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if text_image_index.ndim != 1 or text_image_index.shape[0] != text_emb.shape[0]:
        raise ValueError(
            f"text_image_index must have one entry per caption: shape "
            f"{tuple(text_image_index.shape)}, but text_emb has {text_emb.shape[0]} rows"
        )
    if text_image_index.dtype.is_floating_point or text_image_index.dtype == torch.bool:
        raise ValueError(f"text_image_index must be an integer tensor, got {text_image_index.dtype}")
    text_image_index = text_image_index.to(device=text_emb.device, dtype=torch.long)
    n_images = image_emb.shape[0]
    bad = (text_image_index < 0) | (text_image_index >= n_images)
    if bad.any():
        t = int(bad.nonzero()[0])
        raise ValueError(
            f"text_image_index out of range: caption {t} points at image "
            f"{int(text_image_index[t])}, but there are {n_images} images"
        )
    captions_per_image = torch.bincount(text_image_index, minlength=n_images)
    orphans = (captions_per_image == 0).nonzero().flatten()
    if orphans.numel():
        shown = ", ".join(str(int(i)) for i in orphans[:10])
        more = f" (and {orphans.numel() - 10} more)" if orphans.numel() > 10 else ""
        raise ValueError(f"images with no caption: image index {shown}{more}")
    return text_image_index


def _rank_summary(direction: str, ranks: Tensor) -> dict[str, float]:
    """Median (mean of the two middle values for an even count, like numpy) and mean rank."""
    # Sort instead of torch.quantile, which refuses inputs over 16M elements.
    ranks = ranks.double().sort().values
    n = ranks.numel()
    median = ranks[n // 2] if n % 2 else (ranks[n // 2 - 1] + ranks[n // 2]) / 2
    return {
        f"{direction}_median_rank": float(median),
        f"{direction}_mean_rank": float(ranks.mean()),
    }


def _cosine_summary(image_emb: Tensor, text_emb: Tensor, text_image_index: Tensor) -> dict[str, float]:
    """Mean cosine of matching pairs and of all non-matching pairs, without the full matrix.

    The sum over ALL pairs factorises: sum_i sum_t <x_i, y_t> = <sum_i x_i, sum_t y_t>. float64
    keeps that subtraction from losing digits on 125M pairs.
    """
    images, texts = image_emb.double(), text_emb.double()
    matched = (texts * images[text_image_index]).sum(dim=1)  # (n_texts,)
    total = images.sum(dim=0) @ texts.sum(dim=0)
    n_unmatched = images.shape[0] * texts.shape[0] - texts.shape[0]
    mean_matched = float(matched.mean())
    mean_unmatched = float((total - matched.sum()) / n_unmatched) if n_unmatched else float("nan")
    return {
        "mean_cosine_matched": mean_matched,
        "mean_cosine_unmatched": mean_unmatched,
        "cosine_gap": mean_matched - mean_unmatched,
    }
