"""retrieval_metrics against independent brute-force references.

The recall reference below is LAION CLIP_benchmark's own code
(`clip_benchmark/metrics/zeroshot_retrieval.py`, `recall_at_k` and `batchify`, MIT licence), copied
nearly verbatim so that "agrees with CLIP_benchmark" is checked, not assumed. It builds the full
texts x images score and positive matrices, which is fine at test sizes.

Exact-equality tests use "grid" embeddings whose coordinates are multiples of 1/64 in 64
dimensions: every dot product is then an exact float32 number whatever order BLAS sums in, so the
full-matrix reference and the chunked implementation see bit-identical scores (and identical ties).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliptune.evaluation.metrics import (
    COUNT_BLOCK_ELEMENTS,
    METRIC_KEYS,
    RECALL_KEYS,
    _top_columns,
    retrieval_metrics,
)


# --- CLIP_benchmark reference (copied, credit above) -------------------------------------------
def recall_at_k(scores, positive_pairs, k):
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    topk_indices_onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
    positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
    nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def batchify(func, X, Y, batch_size, device, *args, **kwargs):
    results = []
    for start in range(0, len(X), batch_size):
        end = start + batch_size
        x = X[start:end].to(device)
        y = Y[start:end].to(device)
        results.append(func(x, y, *args, **kwargs).cpu())
    return torch.cat(results)


def clip_benchmark_recalls(image_emb, text_emb, text_image_index, batch_size=64):
    """CLIP_benchmark's `evaluate` body, renamed to cliptune's keys and scaled to percent.

    CLIP_benchmark's "image_retrieval" is text->image and "text_retrieval" is image->text.
    """
    scores = text_emb @ image_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), text_image_index] = True
    out = {}
    for k in (1, 5, 10):
        t2i = batchify(recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0
        i2t = batchify(recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0
        out[f"image_to_text_R@{k}"] = 100.0 * i2t.float().mean().item()
        out[f"text_to_image_R@{k}"] = 100.0 * t2i.float().mean().item()
    return out


# --- numpy reference for ranks and cosines ---------------------------------------------------
def numpy_reference(image_emb, text_emb, text_image_index):
    """Ranks as 1 + (number of candidates scoring strictly higher), by explicit loops."""
    index = text_image_index.numpy()
    # The one float32 product CLIP_benchmark also makes; everything after it is float64 numpy.
    scores = (text_emb @ image_emb.T).numpy().astype(np.float64)  # (n_texts, n_images)
    t2i = np.array([1 + np.sum(scores[t] > scores[t, index[t]]) for t in range(len(index))])
    i2t = []
    for i in range(image_emb.shape[0]):
        best_true = scores[index == i, i].max()
        i2t.append(1 + np.sum(scores[:, i] > best_true))
    matched = scores[np.arange(len(index)), index]
    unmatched_mask = np.ones_like(scores, dtype=bool)
    unmatched_mask[np.arange(len(index)), index] = False
    return {
        "image_to_text_median_rank": float(np.median(i2t)),
        "image_to_text_mean_rank": float(np.mean(i2t)),
        "text_to_image_median_rank": float(np.median(t2i)),
        "text_to_image_mean_rank": float(np.mean(t2i)),
        "mean_cosine_matched": float(matched.mean()),
        "mean_cosine_unmatched": float(scores[unmatched_mask].mean()),
    }


# --- fixtures ---------------------------------------------------------------------------------
def grid_embeddings(n: int, dim: int, generator: torch.Generator, step: int = 64) -> torch.Tensor:
    """Near-unit vectors on a 1/step grid: their float32 dot products are exact."""
    x = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    return torch.round(x * step) / step


def paired_data(captions_per_image: list[int], dim: int = 64, noise: float = 1.0, seed: int = 0):
    """Images plus captions that are noisy copies of their image, so recall is neither 0 nor 100."""
    g = torch.Generator().manual_seed(seed)
    n_images = len(captions_per_image)
    index = torch.repeat_interleave(torch.arange(n_images), torch.tensor(captions_per_image))
    images = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    texts = F.normalize(images[index] + noise * torch.randn(len(index), dim, generator=g) / dim**0.5, dim=-1)
    # Shuffle captions so a caption's image can't be read off its position.
    perm = torch.randperm(len(index), generator=g)
    return images, texts[perm], index[perm]


def to_grid(x: torch.Tensor, step: int = 64) -> torch.Tensor:
    return torch.round(x * step) / step


def assert_matches_references(images, texts, index, chunk_size=1024, exact_ranks=True):
    got = retrieval_metrics(images, texts, index, chunk_size=chunk_size)
    assert list(got) == list(METRIC_KEYS)
    want = clip_benchmark_recalls(images, texts, index)
    for key in RECALL_KEYS:
        # Both are count / n; compare the counts so float formatting can't hide a one-off miss.
        n = images.shape[0] if key.startswith("image_to_text") else texts.shape[0]
        assert round(got[key] * n / 100) == round(want[key] * n / 100), key
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    assert got["rsum"] == pytest.approx(sum(got[k] for k in RECALL_KEYS))
    ref = numpy_reference(images, texts, index)
    for key, value in ref.items():
        if key.endswith("rank") and exact_ranks:
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["cosine_gap"] == pytest.approx(
        ref["mean_cosine_matched"] - ref["mean_cosine_unmatched"], abs=1e-6
    )
    return got


# --- tests ------------------------------------------------------------------------------------
def test_five_captions_per_image_float_embeddings():
    # Plain float32 embeddings at the default chunk size, which is the CLIP_benchmark setting.
    images, texts, index = paired_data([5] * 120, dim=128, noise=6.0)
    got = assert_matches_references(images, texts, index)
    assert 0 < got["image_to_text_R@1"] < 100 and 0 < got["text_to_image_R@1"] < 100


def test_five_captions_per_image_grid_embeddings():
    images, texts, index = paired_data([5] * 100, noise=4.0, seed=1)
    got = assert_matches_references(to_grid(images), to_grid(texts), index)
    assert 0 < got["text_to_image_R@1"] < got["text_to_image_R@5"] < 100


def test_variable_captions_per_image():
    g = torch.Generator().manual_seed(2)
    counts = torch.randint(1, 6, (90,), generator=g).tolist()
    assert min(counts) == 1 and max(counts) == 5
    images, texts, index = paired_data(counts, noise=4.0, seed=2)
    assert_matches_references(to_grid(images), to_grid(texts), index)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_follow_topk_like_clip_benchmark(seed):
    # Coarse grid in 8 dims plus duplicated rows: many exactly tied scores, also at the top-k cut.
    g = torch.Generator().manual_seed(seed)
    images = grid_embeddings(60, 8, g, step=2)
    images[30:40] = images[0:10]  # duplicate images: their captions tie between two images
    index = torch.randint(0, 60, (240,), generator=g)
    index[:60] = torch.arange(60)  # every image gets a caption
    texts = grid_embeddings(240, 8, g, step=2)
    texts[120:180] = texts[60:120]  # duplicate captions describing different images
    got = assert_matches_references(images, texts, index)

    # The case really has ties that decide recall: counting ties in the item's favour
    # (rank <= K) would give a different R@1 than topk's tie order.
    scores = texts @ images.T
    true_score = scores.gather(1, index[:, None])
    optimistic_r1 = 100.0 * ((scores > true_score).sum(1) == 0).float().mean().item()
    assert optimistic_r1 != pytest.approx(got["text_to_image_R@1"])


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunk_size_does_not_change_results(chunk_size):
    g = torch.Generator().manual_seed(3)
    counts = torch.randint(1, 6, (70,), generator=g).tolist()
    images, texts, index = paired_data(counts, noise=4.0, seed=3)
    images, texts = to_grid(images), to_grid(texts)
    texts[10:20] = texts[40:50]  # ties too, so topk's tie order must survive chunking
    small = assert_matches_references(images, texts, index, chunk_size=chunk_size)
    assert small == retrieval_metrics(images, texts, index, chunk_size=100_000)


def test_hand_computed_example():
    images = torch.eye(3)
    texts = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # t0 -> i0, scores [1, 0, 0]: rank 1
            [0.8, 0.6, 0.0],  # t1 -> i1, scores [.8, .6, 0]: rank 2
            [0.6, 0.0, 0.8],  # t2 -> i2, scores [.6, 0, .8]: rank 1
            [0.0, 0.8, 0.6],  # t3 -> i2, scores [0, .8, .6]: rank 2
        ]
    )
    index = torch.tensor([0, 1, 2, 2])
    got = retrieval_metrics(images, texts, index)
    # image rows: i0 [1, .8, .6, 0] -> t0 rank 1; i1 [0, .6, 0, .8] -> t1 rank 2;
    # i2 [0, 0, .8, .6] -> best true t2 rank 1.
    assert got["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert got["image_to_text_R@5"] == got["image_to_text_R@10"] == 100.0  # K clipped to 4 texts
    assert got["text_to_image_R@1"] == 50.0
    assert got["text_to_image_R@5"] == got["text_to_image_R@10"] == 100.0
    assert got["rsum"] == pytest.approx(200 / 3 + 100 + 100 + 50 + 100 + 100)
    assert got["image_to_text_median_rank"] == 1.0
    assert got["image_to_text_mean_rank"] == pytest.approx(4 / 3)
    assert got["text_to_image_median_rank"] == 1.5
    assert got["text_to_image_mean_rank"] == 1.5
    # matched: 1 + .6 + .8 + .6 = 3.0 over 4; all 12 pairs sum to 5.2, so unmatched 2.2 over 8.
    assert got["mean_cosine_matched"] == pytest.approx(0.75, abs=1e-6)
    assert got["mean_cosine_unmatched"] == pytest.approx(0.275, abs=1e-6)
    assert got["cosine_gap"] == pytest.approx(0.475, abs=1e-6)


def test_perfect_embeddings():
    g = torch.Generator().manual_seed(4)
    images = F.normalize(torch.randn(50, 32, generator=g), dim=-1)
    index = torch.arange(50).repeat_interleave(5)
    got = retrieval_metrics(images, images[index].clone(), index, chunk_size=16)
    for key in RECALL_KEYS:
        assert got[key] == 100.0
    assert got["rsum"] == 600.0
    for key in ("image_to_text", "text_to_image"):
        assert got[f"{key}_median_rank"] == 1.0 and got[f"{key}_mean_rank"] == 1.0
    assert got["mean_cosine_matched"] == pytest.approx(1.0, abs=1e-6)


def test_single_image_has_no_unmatched_pairs():
    got = retrieval_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]]), torch.tensor([0]))
    assert got["image_to_text_R@1"] == got["text_to_image_R@1"] == 100.0
    assert np.isnan(got["mean_cosine_unmatched"])


def test_key_order():
    assert RECALL_KEYS == (
        "image_to_text_R@1",
        "image_to_text_R@5",
        "image_to_text_R@10",
        "text_to_image_R@1",
        "text_to_image_R@5",
        "text_to_image_R@10",
    )
    assert METRIC_KEYS[:7] == (*RECALL_KEYS, "rsum")
    assert set(METRIC_KEYS[7:]) == {
        "image_to_text_median_rank",
        "image_to_text_mean_rank",
        "text_to_image_median_rank",
        "text_to_image_mean_rank",
        "mean_cosine_matched",
        "mean_cosine_unmatched",
        "cosine_gap",
    }


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (torch.tensor([0, 1, 2]), "one entry per caption"),
        (torch.tensor([0, 1, 2, 3]), "out of range: caption 3 points at image 3"),
        (torch.tensor([0, -1, 2, 2]), "out of range: caption 1"),
        (torch.tensor([0, 0, 2, 2]), "no caption: image index 1"),
        (torch.tensor([0.0, 1.0, 2.0, 2.0]), "integer"),
    ],
)
def test_bad_text_image_index(index, message):
    images, texts = torch.eye(3), torch.eye(3)[[0, 1, 2, 2]]
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts, index)


def test_bad_shapes():
    with pytest.raises(ValueError, match="widths differ"):
        retrieval_metrics(torch.eye(3), torch.ones(3, 4), torch.arange(3))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.arange(3), chunk_size=0)


def test_embeddings_that_require_grad():
    # Evaluation inside a training loop may pass tensors still attached to the graph.
    images, texts, index = paired_data([2] * 20, noise=4.0, seed=5)
    got = retrieval_metrics(images.requires_grad_(), texts.requires_grad_(), index)
    assert got == retrieval_metrics(images.detach(), texts.detach(), index)


# --- the memory-bounded rewrite equals the formulas it replaced ---------------------------------
def old_image_to_text_ranks(image_emb, text_emb, text_image_index, chunk_size):
    """The image->text ranks as computed before the rewrite: a (chunk, n_texts) mask per chunk."""
    ranks = []
    for start in range(0, image_emb.shape[0], chunk_size):
        image_ids = torch.arange(start, min(start + chunk_size, image_emb.shape[0]))
        scores = image_emb[image_ids] @ text_emb.T
        is_true = text_image_index[None, :] == image_ids[:, None]
        best_true = scores.masked_fill(~is_true, float("-inf")).amax(dim=1)
        ranks.append(1 + (scores > best_true[:, None]).sum(dim=1))
    return torch.cat(ranks).double()


def old_cosine_summary(image_emb, text_emb, text_image_index):
    """The cosine summary as computed before the rewrite: whole float64 copies of both tables."""
    images, texts = image_emb.double(), text_emb.double()
    matched = (texts * images[text_image_index]).sum(dim=1)
    total = images.sum(dim=0) @ texts.sum(dim=0)
    n_unmatched = images.shape[0] * texts.shape[0] - texts.shape[0]
    return float(matched.mean()), float((total - matched.sum()) / n_unmatched)


@pytest.mark.parametrize("chunk_size", [5, 64, 1024])
def test_image_to_text_ranks_equal_the_masked_formula(chunk_size):
    # Float (not grid) embeddings, captions shuffled, 1 to 5 captions per image, duplicated captions
    # for exact ties: the best true caption's score must be the very value the masked max picked.
    g = torch.Generator().manual_seed(7)
    counts = torch.randint(1, 6, (150,), generator=g).tolist()
    images, texts, index = paired_data(counts, dim=96, noise=5.0, seed=7)
    texts[30:60] = texts[100:130]
    got = retrieval_metrics(images, texts, index, chunk_size=chunk_size)
    want = old_image_to_text_ranks(images, texts, index, chunk_size)
    assert got["image_to_text_mean_rank"] == float(want.mean())
    assert got["image_to_text_median_rank"] == float(np.median(want.numpy()))


def test_cosine_summary_equals_the_whole_table_formula():
    images, texts, index = paired_data([5] * 200, dim=128, noise=6.0, seed=8)
    matched, unmatched = old_cosine_summary(images, texts, index)
    one_chunk = retrieval_metrics(images, texts, index, chunk_size=len(index))
    assert (one_chunk["mean_cosine_matched"], one_chunk["mean_cosine_unmatched"]) == (matched, unmatched)
    # Several chunks: per-caption cosines are the same bits; the column sums only round differently.
    chunked = retrieval_metrics(images, texts, index, chunk_size=7)
    assert chunked["mean_cosine_matched"] == matched
    assert chunked["mean_cosine_unmatched"] == pytest.approx(unmatched, rel=1e-12, abs=1e-15)


def _process_memory_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def test_peak_memory_is_one_score_block_not_a_multiple():
    """100k images x 500k captions must fit: beyond the (chunk, n) score block itself, memory may not
    grow with n (the old code held a bool mask, a masked copy, the bool->int64 cast of a comparison
    and float64 copies of all captions: 346 MB here)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # reset this process's peak RSS (VmHWM) to its current RSS
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    g = torch.Generator().manual_seed(9)
    n_images, n_texts = 256, 100_000  # the default chunk_size (1024) scores all 256 images at once
    images = F.normalize(torch.randn(n_images, 32, generator=g), dim=-1)
    index = torch.arange(n_texts) % n_images
    texts = F.normalize(images[index] + torch.randn(n_texts, 32, generator=g), dim=-1)
    retrieval_metrics(images[:8], texts[:64], index[:64] % 8)  # first-call allocations, not measured
    block_mb = n_images * n_texts * 4 / 2**20  # 98 MB
    # Plus a fixed allowance: _count_above's blocks (72 MB), BLAS work buffers (~20 MB seen) and slack.
    allowance_mb = 9 * COUNT_BLOCK_ELEMENTS / 2**20 + 48
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    before = _process_memory_mb("VmRSS")
    retrieval_metrics(images, texts, index)
    growth = _process_memory_mb("VmHWM") - before
    assert growth < block_mb + allowance_mb, f"peak grew {growth:.0f} MB for a {block_mb:.0f} MB score block"


@pytest.mark.parametrize("seed", [0, 1])
def test_one_topk_call_picks_the_same_columns_as_one_call_per_k(seed):
    # A coarse grid in 4 dims: scores take few distinct values, so many rows tie at the 1st, 5th or
    # 10th place, where topk(10)[:, :k] and topk(k) may pick different columns.
    g = torch.Generator().manual_seed(seed)
    scores = grid_embeddings(300, 4, g, step=2) @ grid_embeddings(40, 4, g, step=2).T  # (300, 40)
    scores[:5, 3] = float("nan")
    tops = _top_columns(scores, (1, 5, 10))
    for k in (1, 5, 10):
        assert torch.equal(tops[k].sort(dim=1).values, scores.topk(k, dim=1).indices.sort(dim=1).values), k
    # The case really has rows where the shortcut would have picked other columns.
    widest = scores.topk(10, dim=1).indices
    assert any(not torch.equal(widest[:, :k].sort(dim=1).values, scores.topk(k, dim=1).indices.sort(dim=1).values)
               for k in (1, 5))
    # Fewer candidates than k: k is clipped to their number.
    assert _top_columns(scores[:, :3], (1, 5, 10))[10].shape == (300, 3)
