"""cliptune.training.loss against independent references written from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cliptune.distributed import gather_rows, gather_with_grad
from cliptune.training.loss import clip_loss, siglip_loss


def _features(n: int = 5, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def reference_clip_loss(image, text, t):
    """CLIP paper, Figure 3 pseudo-code: symmetric cross-entropy over cosine logits."""
    i_e = image / image.norm(dim=1, keepdim=True)
    t_e = text / text.norm(dim=1, keepdim=True)
    logits = i_e @ t_e.T * t
    labels = torch.arange(len(image))
    loss_i = F.cross_entropy(logits, labels)  # axis 0 in the paper's numpy
    loss_t = F.cross_entropy(logits.T, labels)
    return (loss_i + loss_t) / 2


def reference_siglip_loss(image, text, t, b, positive):
    """SigLIP paper, eq. 1: -1/|B| sum_i sum_j log sigmoid(z_ij * (t x_i.y_j + b)), written as loops."""
    x = [v / math.sqrt(float(v @ v)) for v in image]
    y = [v / math.sqrt(float(v @ v)) for v in text]
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            z = 1.0 if positive(i, j) else -1.0
            logit = t * float(x[i] @ y[j]) + b
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / len(x)


def test_clip_loss_matches_the_papers_pseudocode_when_all_images_differ():
    image, text = _features()
    scale = torch.tensor(7.5)
    expected = reference_clip_loss(image, text, scale)
    assert torch.allclose(clip_loss(image, text, scale, torch.arange(5)), expected, atol=1e-6)
    assert torch.allclose(clip_loss(image, text, scale), expected, atol=1e-6)


def test_clip_loss_excludes_other_positives_of_the_same_image():
    # Rows 0 and 1 are two captions of image 7; row 2 is another image. Worked by hand below.
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0, 1.0]])
    ids = torch.tensor([7, 7, 9])
    s = torch.tensor(2.0)
    sim = (image @ text.T) * 2.0  # rows already unit-norm
    # Image->text, row 0: candidates {0, 2} (1 is a positive of the same image, excluded).
    def ce(row_logits, target):
        return -row_logits[target] + torch.logsumexp(row_logits, 0)
    i2t = [ce(sim[0, [0, 2]], 0), ce(sim[1, [1, 2]], 0), ce(sim[2, [0, 1, 2]], 2)]
    t2i = [ce(sim[[0, 2], 0], 0), ce(sim[[1, 2], 1], 0), ce(sim[[0, 1, 2], 2], 2)]
    expected = (sum(i2t) / 3 + sum(t2i) / 3) / 2
    got = clip_loss(image, text, s, ids)
    assert torch.allclose(got, expected, atol=1e-6)
    # And it is not the loss that treats the duplicate as a negative.
    assert not torch.allclose(got, reference_clip_loss(image, text, s), atol=1e-3)


@pytest.mark.parametrize("ids", [None, [0, 1, 2, 3, 4], [0, 0, 1, 2, 2]])
def test_siglip_loss_matches_the_papers_formula(ids):
    image, text = _features(seed=3)
    t, b = 10.0, -10.0
    image_ids = None if ids is None else torch.tensor(ids)
    positive = (lambda i, j: i == j) if ids is None else (lambda i, j: ids[i] == ids[j])
    expected = reference_siglip_loss(image.double(), text.double(), t, b, positive)
    got = siglip_loss(image, text, torch.tensor(t), torch.tensor(b), image_ids)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    ids = torch.arange(3)
    assert gather_rows(ids) is ids


def _shared_weight_loss(x_image, x_text, ids, weight):
    return clip_loss(gather_with_grad(x_image @ weight), gather_with_grad(x_text @ weight), torch.tensor(5.0),
                     gather_rows(ids))


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        x_image, x_text, weight = torch.randn(4, 6), torch.randn(4, 6), torch.randn(6, 5)
        ids = torch.tensor([0, 1, 1, 2])
        weight.requires_grad_(True)
        mine = slice(rank * 2, rank * 2 + 2)
        loss = _shared_weight_loss(x_image[mine], x_text[mine], ids[mine], weight)
        loss.backward()
        # What DDP does with a shared parameter's gradient: average it over the ranks.
        dist.all_reduce(weight.grad)
        weight.grad /= world
        if rank == 0:
            torch.save({"loss": loss.detach(), "grad": weight.grad}, out)
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_across_two_gloo_processes_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_gather_worker, args=(2, port, out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    x_image, x_text, weight = torch.randn(4, 6), torch.randn(4, 6), torch.randn(6, 5)
    weight.requires_grad_(True)
    loss = _shared_weight_loss(x_image, x_text, torch.tensor([0, 1, 1, 2]), weight)
    loss.backward()
    assert torch.allclose(result["loss"], loss.detach(), atol=1e-6)
    assert torch.allclose(result["grad"], weight.grad, atol=1e-6)
