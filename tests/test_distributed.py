"""Two gloo processes on CPU give one process's loss and LoRA gradients on the concatenated batch,
through `Trainer.train_step` (accelerate's Accelerator + DDP via `_wrap_ddp`)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cliptune.config import load_config
from cliptune.training.recipe import Trainer

TEXTS = ["a red circle", "a blue square", "a photo of a dog", "red square",
         "a blue dog", "a circle photo", "dog of a photo", "square circle"]
IDS = (0, 1, 2, 2, 3, 4, 5, 0)  # duplicates inside a rank and across ranks


def make_trainer(model_dir: str, accumulation: str, micro: int, accum: int) -> Trainer:
    config = load_config(None, {"model.name": model_dir, "train.device": "cpu", "lora.r": 4, "lora.dropout": 0.0,
                                "train.accumulation": accumulation, "train.micro_batch_size": micro,
                                "train.grad_accum_steps": accum})
    trainer = Trainer(config, progress=False)
    trainer.setup_model()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero B, so every LoRA factor gets a gradient
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    trainer.model.train()
    trainer.ddp_model = trainer._wrap_ddp()
    trainer.scaler = None
    return trainer


def make_batches(trainer: Trainer, rows: range, micro: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    size = trainer.preprocessing.image_size
    pixels = torch.randint(0, 256, (len(TEXTS), 3, size, size), dtype=torch.uint8, generator=g)
    rows = list(rows)
    batches = []
    for start in range(0, len(rows), micro):
        idx = rows[start: start + micro]
        tokens = trainer.preprocessing.tokenize([TEXTS[i] for i in idx])
        batches.append({"pixels": pixels[idx], "input_ids": tokens["input_ids"],
                        "attention_mask": tokens["attention_mask"], "image_ids": torch.tensor([IDS[i] for i in idx])})
    return batches


def step_result(trainer: Trainer, batches: list[dict], accumulation: str) -> dict:
    trainer.config.train.accumulation = accumulation
    loss = trainer.train_step(batches)
    trainer._sync_scale_grads()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)
    return {"loss": loss, "grads": grads}


def _worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    trainer = make_trainer(model_dir, "exact", micro=2, accum=2)
    assert trainer.accelerator.num_processes == world
    assert trainer.ddp_model is not trainer.model  # really wrapped in DDP
    share = len(TEXTS) // world
    batches = make_batches(trainer, range(rank * share, (rank + 1) * share), micro=2)
    results = {mode: step_result(trainer, batches, mode) for mode in ("exact", "plain")}
    torch.save(results, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tiny_clip_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "result.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_clip_dir), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("accumulation", ["exact", "plain"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tiny_clip_dir, two_process_results, accumulation):
    single = make_trainer(str(tiny_clip_dir), accumulation, micro=4, accum=2)
    if accumulation == "exact":
        # One process, all 8 pairs: the global batch.
        expected = step_result(single, make_batches(single, range(8), micro=4), accumulation)
    else:
        # Plain: micro-batch i of the step is the union of every rank's i-th micro-batch (rank-major).
        batches = [make_batches(single, [0, 1, 4, 5], micro=4)[0], make_batches(single, [2, 3, 6, 7], micro=4)[0]]
        expected = step_result(single, batches, accumulation)
    for results in two_process_results:
        result = results[accumulation]
        assert torch.allclose(result["loss"], expected["loss"], atol=1e-5)
        assert result["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            scale = grad.abs().max().clamp_min(1e-6)
            assert (result["grads"][name] - grad).abs().max() <= 1e-5 * scale, name


def _siglip_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    trainer = _with_trainable_scales(make_trainer(model_dir, "exact", micro=2, accum=2))
    share = len(TEXTS) // world
    batches = make_batches(trainer, range(rank * share, (rank + 1) * share), micro=2)
    torch.save(step_result(trainer, batches, "exact"), f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _with_trainable_scales(trainer: Trainer) -> Trainer:
    # DDP leaves the temperature and bias to the trainer's own averaging, so they can be switched on after wrapping.
    trainer.model.logit_scale.requires_grad_(True)
    trainer.model.logit_bias.requires_grad_(True)
    return trainer


def test_siglip_loss_across_two_processes_equals_one_process(tiny_siglip_dir, tmp_path):
    """The sigmoid loss over features gathered from 2 gloo ranks (duplicate image ids within and across
    ranks) gives one process's loss and gradients: LoRA factors, temperature and bias."""
    out = str(tmp_path / "siglip.pt")
    mp.spawn(_siglip_worker, args=(2, _free_port(), str(tiny_siglip_dir), out), nprocs=2, join=True)
    single = _with_trainable_scales(make_trainer(str(tiny_siglip_dir), "exact", micro=4, accum=2))
    assert single.model.family == "siglip"
    expected = step_result(single, make_batches(single, range(8), micro=4), "exact")
    assert {"logit_scale", "logit_bias"} <= {name.rsplit(".", 1)[-1] for name in expected["grads"]}
    for rank in range(2):
        result = torch.load(f"{out}.{rank}", weights_only=True)
        assert torch.allclose(result["loss"], expected["loss"], atol=1e-5)
        assert result["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            scale = grad.abs().max().clamp_min(1e-6)
            assert (result["grads"][name] - grad).abs().max() <= 1e-5 * scale, name


# -- evaluation: every rank encodes its share, the gathered embeddings are the whole split's ---------------


def make_eval_dataset(root) -> str:
    """7 noise images (uneven shards over 2 ranks) with 1-3 captions each (uneven caption shards)."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (40, 40 + i, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        captions = [f"picture {i} number {j} of {'many ' * j}things" for j in range(1 + i % 3)]
        lines.append(json.dumps({"image": f"images/{i}.png", "captions": captions, "split": "val"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root / "captions.jsonl")


def evaluation(model_dir: str, data_path: str) -> tuple[dict, object]:
    from cliptune.data.readers import read_split

    config = load_config(None, {"model.name": model_dir, "train.device": "cpu", "lora.r": 4,
                                "data.path": data_path, "train.eval_batch_size": 2})
    trainer = Trainer(config, progress=False)
    trainer.setup_model()
    return trainer.evaluate(read_split(config.data, "val")[0])


def _eval_worker(rank: int, world: int, port: int, model_dir: str, data_path: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    metrics, embeddings = evaluation(model_dir, data_path)
    torch.save({"metrics": metrics, "image_emb": embeddings.image_emb, "text_emb": embeddings.text_emb}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_process_evaluation_gathers_the_whole_split(tiny_clip_dir, tmp_path):
    data_path = make_eval_dataset(tmp_path / "data")
    out = str(tmp_path / "eval.pt")
    mp.spawn(_eval_worker, args=(2, _free_port(), str(tiny_clip_dir), data_path, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    metrics, expected = evaluation(str(tiny_clip_dir), data_path)
    assert expected.image_emb.shape[0] == 7 and expected.text_emb.shape[0] == 13
    for result in ranks:
        assert torch.allclose(result["image_emb"], expected.image_emb, atol=1e-5)
        assert torch.allclose(result["text_emb"], expected.text_emb, atol=1e-5)
        assert result["metrics"].keys() == metrics.keys()
        assert abs(result["metrics"]["val_loss"] - metrics["val_loss"]) < 1e-4
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # the same gathered tensors on every rank


# -- gathering features of different row counts (a rank's micro-batch lost an unreadable image) ---------


def _uneven_features():
    g = torch.Generator().manual_seed(4)
    image, text = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5])
    return image, text, ids


def _uneven_worker(rank: int, world: int, port: int, out: str) -> None:
    from cliptune.distributed import gather_rows, gather_with_grad
    from cliptune.training.loss import clip_loss

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    image, text, ids = _uneven_features()
    rows = slice(0, 3) if rank == 0 else slice(3, 7)  # 3 rows on rank 0, 4 on rank 1
    local_image, local_text = image[rows].clone().requires_grad_(True), text[rows].clone().requires_grad_(True)
    loss = clip_loss(gather_with_grad(local_image), gather_with_grad(local_text), torch.tensor(10.0),
                     gather_rows(ids[rows]))
    loss.backward()
    torch.save({"loss": loss.detach(), "image_grad": local_image.grad, "text_grad": local_text.grad}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_gather_with_grad_handles_ranks_with_different_row_counts(tmp_path):
    from cliptune.training.loss import clip_loss

    out = str(tmp_path / "uneven.pt")
    mp.spawn(_uneven_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    image, text, ids = _uneven_features()
    image.requires_grad_(True)
    text.requires_grad_(True)
    expected = clip_loss(image, text, torch.tensor(10.0), ids)
    expected.backward()
    for rank, rows in ((0, slice(0, 3)), (1, slice(3, 7))):
        result = torch.load(f"{out}.{rank}", weights_only=True)
        assert torch.allclose(result["loss"], expected.detach(), atol=1e-6)
        # Each of the 2 ranks' losses used these rows: their gradient is 2x one loss's (DDP then averages).
        assert torch.allclose(result["image_grad"] / 2, image.grad[rows], atol=1e-6)
        assert torch.allclose(result["text_grad"] / 2, text.grad[rows], atol=1e-6)


# -- a rank whose micro-batch is all unreadable images must not leave the other waiting ------------------


def _bad_shard_worker(rank: int, world: int, port: int, model_dir: str, pattern: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    config = load_config(None, {"model.name": model_dir, "data.path": pattern, "train.device": "cpu",
                                "train.output_dir": f"{out}-run", "train.report": False, "lora.r": 2,
                                "train.micro_batch_size": 2, "train.grad_accum_steps": 1, "train.epochs": 1,
                                "data.num_workers": 0, "data.shuffle_buffer": 1})
    trainer = Trainer(config, progress=False)
    trainer.setup_model()
    trainer.setup_data()
    trainer.setup()
    result = trainer.train()
    torch.save({"steps": result.steps, "skipped": result.skipped_steps, "bad": len(result.bad_images)}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_ranks_agree_to_skip_a_step_when_one_rank_has_no_readable_image(tiny_clip_dir, tmp_path):
    """Shard 0 (rank 0) holds 4 good images; shard 1 (rank 1) one good image, then 3 corrupt ones. Rank 1's
    first micro-batch is 1 good + 1 corrupt (uneven rows across ranks), its second all corrupt: both ranks
    must skip that step together and finish (a hang fails the join timeout)."""
    import io
    import tarfile

    from PIL import Image

    def sample(tar, key, data, caption):
        for name, payload in ((f"{key}.png", data), (f"{key}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "train-000000.tar", "w") as tar:
        for i in range(4):
            sample(tar, f"good{i}", png((60 * i, 20, 200)), f"picture {i}")
    with tarfile.open(tmp_path / "shards" / "train-000001.tar", "w") as tar:
        sample(tar, "fine", png((10, 200, 10)), "a green picture")
        for i in range(3):
            sample(tar, f"bad{i}", b"\x89PNG not really", f"broken {i}")
    out = str(tmp_path / "bad")
    context = mp.spawn(_bad_shard_worker, args=(2, _free_port(), str(tiny_clip_dir),
                                                str(tmp_path / "shards" / "{split}-{000000..000001}.tar"), out),
                       nprocs=2, join=False)
    for _ in range(120):
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the 2 ranks did not finish: a collective is waiting on one of them")
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2  # 8 samples, 2 ranks x micro-batch 2
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    assert ranks[1]["bad"] == 3
