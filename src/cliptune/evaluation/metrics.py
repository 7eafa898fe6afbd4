"""Image-text retrieval metrics under the standard R@K protocol.

Every caption is scored against every image. image->text R@K counts an image as a hit when ANY of
its captions is among its top K texts; text->image R@K counts a caption as a hit when its one image
is among its top K images. The recall values agree exactly with LAION's CLIP_benchmark
(`clip_benchmark/metrics/zeroshot_retrieval.py`, `recall_at_k(...) > 0`), ties included: hits are
the columns `torch.topk` picks with the same k on the same score rows, so ties are broken the way
CLIP_benchmark breaks them (one topk call serves every k unless a tie crosses the k-th place).

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

    # Caption ids grouped by their image (stable, so in caption order within an image), and where
    # each image's group starts: a chunk of images owns one contiguous slice of `captions_by_image`.
    captions_by_image = torch.argsort(text_image_index, stable=True)  # (n_texts,)
    group_starts = torch.zeros(n_images + 1, dtype=torch.long, device=text_emb.device)
    group_starts[1:] = torch.bincount(text_image_index, minlength=n_images).cumsum(0)

    i2t_hits = {k: 0 for k in RECALL_KS}
    i2t_ranks: list[Tensor] = []
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        image_ids = torch.arange(start, stop, device=image_emb.device)
        scores = image_emb[start:stop] @ text_emb.T  # (chunk, n_texts)
        for k, top in _top_columns(scores, RECALL_KS).items():  # top: (chunk, k)
            i2t_hits[k] += int((text_image_index[top] == image_ids[:, None]).any(dim=1).sum())
        # The best true caption's score, read from `scores` itself (a recomputed dot product could
        # round differently and miscount the true caption as scoring higher than itself), by
        # gathering only the chunk's own (image, caption) cells: a (chunk, n_texts) mask and masked
        # copy of `scores` cost 3 GB per 1024 images at 500k captions.
        true_captions = captions_by_image[group_starts[start]:group_starts[stop]]  # (captions of chunk,)
        true_rows = text_image_index[true_captions] - start
        best_true = torch.full((stop - start,), float("-inf"), dtype=scores.dtype, device=scores.device)
        best_true.scatter_reduce_(0, true_rows, scores[true_rows, true_captions], reduce="amax")  # (chunk,)
        i2t_ranks.append(1 + _count_above(scores, best_true))
        del scores  # before the next block is allocated: otherwise two blocks are alive at once

    t2i_hits = {k: 0 for k in RECALL_KS}
    t2i_ranks: list[Tensor] = []
    for start in range(0, n_texts, chunk_size):
        stop = min(start + chunk_size, n_texts)
        scores = text_emb[start:stop] @ image_emb.T  # (chunk, n_images)
        true_image = text_image_index[start:stop]  # (chunk,)
        for k, top in _top_columns(scores, RECALL_KS).items():  # top: (chunk, k)
            t2i_hits[k] += int((top == true_image[:, None]).any(dim=1).sum())
        true_score = scores.gather(1, true_image[:, None])  # (chunk, 1)
        t2i_ranks.append(1 + _count_above(scores, true_score[:, 0]))
        del scores

    metrics: dict[str, float] = {}
    for k in RECALL_KS:
        metrics[f"image_to_text_R@{k}"] = 100.0 * i2t_hits[k] / n_images
    for k in RECALL_KS:
        metrics[f"text_to_image_R@{k}"] = 100.0 * t2i_hits[k] / n_texts
    metrics["rsum"] = sum(metrics[key] for key in RECALL_KEYS)
    metrics.update(_rank_summary("image_to_text", torch.cat(i2t_ranks)))
    metrics.update(_rank_summary("text_to_image", torch.cat(t2i_ranks)))
    metrics.update(_cosine_summary(image_emb, text_emb, text_image_index, chunk_size))
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


def _top_columns(scores: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """For each k, the set of columns `scores.topk(k, dim=1)` picks in each row, from one topk call.

    CLIP_benchmark calls topk once per k, and topk(10)[:, :5] may break a tie at the 5th place
    differently from topk(5). Where the k-th largest score is strictly above the (k+1)-th, the k
    largest are the same set whichever call picks them; only rows tied across that cut (or holding
    NaN) are asked topk(k) again. One topk pass instead of three over (chunk, n) scores.
    """
    n = scores.shape[1]
    widest = min(max(ks), n)
    values, columns = scores.topk(widest, dim=1)  # sorted, best first
    tops = {}
    for k in ks:
        top = columns[:, :min(k, n)]
        if k < widest:
            tied = (~(values[:, k - 1] > values[:, k])).nonzero().flatten()
            if tied.numel():
                top = top.clone()
                top[tied] = scores[tied].topk(k, dim=1).indices
        tops[k] = top
    return tops


# Scores compared and counted at once by `_count_above`: its temporaries take 9 bytes per score.
COUNT_BLOCK_ELEMENTS = 1 << 23


def _count_above(scores: Tensor, threshold: Tensor, block_elements: int = COUNT_BLOCK_ELEMENTS) -> Tensor:
    """`(scores > threshold[:, None]).sum(dim=1)`, a block of whole rows at a time.

    Summing a bool tensor casts it to int64 first: a (1024, 500k) comparison would take 4 GB, twice
    the scores themselves. Blocks of ~8M scores bound that at 64 MB, and every block's comparison is
    written into one reused bool buffer (8 MB): a fresh one per block piled up in the heap, 0.6 GB
    over a (1024, 500k) block. Whole rows keep each block contiguous (slices of columns were
    slower). Counts are integers, so the result is exactly the same.
    """
    rows = max(1, block_elements // max(1, scores.shape[1]))
    above = torch.empty((min(rows, scores.shape[0]), scores.shape[1]), dtype=torch.bool, device=scores.device)
    counts = []
    for start in range(0, scores.shape[0], rows):
        block = above[:min(rows, scores.shape[0] - start)]
        torch.gt(scores[start:start + rows], threshold[start:start + rows, None], out=block)
        counts.append(block.sum(dim=1))
    return torch.cat(counts)


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


def _cosine_summary(
    image_emb: Tensor, text_emb: Tensor, text_image_index: Tensor, chunk_size: int
) -> dict[str, float]:
    """Mean cosine of matching pairs and of all non-matching pairs, without the full matrix.

    The sum over ALL pairs factorises: sum_i sum_t <x_i, y_t> = <sum_i x_i, sum_t y_t>. float64
    keeps that subtraction from losing digits on 125M pairs. Rows are cast to float64 `chunk_size`
    at a time: a whole float64 copy of 500k captions and of their images' rows is 4 GB. Per-caption
    cosines are the same bits either way; the column sums differ from one whole-tensor sum only in
    float64 rounding (summation order) once there is more than one chunk.
    """
    matched = torch.cat([
        (text_emb[start:start + chunk_size].double()
         * image_emb[text_image_index[start:start + chunk_size]].double()).sum(dim=1)
        for start in range(0, text_emb.shape[0], chunk_size)
    ])  # (n_texts,)
    total = _column_sum_float64(image_emb, chunk_size) @ _column_sum_float64(text_emb, chunk_size)
    n_unmatched = image_emb.shape[0] * text_emb.shape[0] - text_emb.shape[0]
    mean_matched = float(matched.mean())
    mean_unmatched = float((total - matched.sum()) / n_unmatched) if n_unmatched else float("nan")
    return {
        "mean_cosine_matched": mean_matched,
        "mean_cosine_unmatched": mean_unmatched,
        "cosine_gap": mean_matched - mean_unmatched,
    }


def _column_sum_float64(rows: Tensor, chunk_size: int) -> Tensor:
    """`rows.double().sum(dim=0)` without the float64 copy of `rows` (`sum(dtype=...)` makes one too)."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], chunk_size):
        total += rows[start:start + chunk_size].double().sum(dim=0)
    return total
