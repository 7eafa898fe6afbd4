"""Exact (GradCache) accumulation gives one big batch's gradients; plain accumulation is the mean of
micro-batch losses. Run through `Trainer.train_step` on tiny models, with LoRA dropout on."""

from __future__ import annotations

import pytest
import torch

from cliptune.config import load_config
from cliptune.train import Trainer, _RngReplay

TEXTS = ["a red circle", "a blue square", "a photo of a dog", "red square", "a blue dog", "a circle photo"]


@pytest.fixture(scope="module")
def tiny_dual_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel

    from cliptune.dual_encoder import compose_dual_encoder, save_composed

    root = tmp_path_factory.mktemp("dual")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(root / "vit")
    (root / "vit" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}')
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "dog", "photo", "of"]
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "bert")
    model, tokenizer = compose_dual_encoder(str(root / "vit"), str(root / "bert"), projection_dim=16)
    return save_composed(model, tokenizer, root / "composed")


def make_trainer(model_dir, accumulation: str, micro: int, accum: int, dropout: float = 0.2,
                 checkpointing: bool = False) -> Trainer:
    config = load_config(None, {"model.name": str(model_dir), "train.device": "cpu", "lora.r": 4,
                                "lora.dropout": dropout, "train.accumulation": accumulation,
                                "train.micro_batch_size": micro, "train.grad_accum_steps": accum,
                                "train.gradient_checkpointing": checkpointing})
    trainer = Trainer(config, progress=False)
    trainer.setup_model()
    trainer.ddp_model = trainer._wrap_ddp()
    trainer.scaler = None
    # LoRA's B starts at zero, which would make the LoRA branch (and its dropout) invisible in the
    # outputs; give it values, as after some training, so dropout changes the features.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    trainer.model.train()
    return trainer


def make_batches(trainer: Trainer, sizes: list[int], ids=(0, 1, 2, 3, 4, 5)) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    size = trainer.preprocessing.image_size
    pixels = torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8, generator=g)
    batches, start = [], 0
    for n in sizes:
        tokens = trainer.preprocessing.tokenize(TEXTS[start: start + n])
        batches.append({"pixels": pixels[start: start + n], "input_ids": tokens["input_ids"],
                        "attention_mask": tokens["attention_mask"],
                        "image_ids": torch.tensor(ids[start: start + n])})
        start += n
    return batches


def lora_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads and any("lora_" in n for n in grads)
    trainer.model.zero_grad(set_to_none=True)
    return grads


def reference_step(trainer: Trainer, batches: list[dict]) -> tuple[torch.Tensor, dict]:
    """One autograd graph over all pairs: each micro-batch encoded with gradients in turn (so the
    dropout masks are drawn from the same RNG stream as the trainer's first pass), one loss."""
    images, texts, ids = [], [], []
    for batch in batches:
        pixels, input_ids, mask, image_ids = trainer._inputs(batch)
        image, text = trainer.model(pixels, input_ids, mask)
        images.append(image)
        texts.append(text)
        ids.append(image_ids)
    loss = trainer.loss_fn(torch.cat(images), torch.cat(texts), trainer.model, torch.cat(ids))
    loss.backward()
    return loss.detach(), lora_grads(trainer)


def assert_grads_close(got: dict, expected: dict, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding: the largest difference is tiny next to the tensor's largest entry."""
    assert got.keys() == expected.keys()
    for name in got:
        scale = expected[name].abs().max().clamp_min(1e-6)
        assert (got[name] - expected[name]).abs().max() <= tol * scale, name


@pytest.fixture(params=["clip", "dual"])
def model_dir(request, tiny_clip_dir, tiny_dual_dir):
    return tiny_clip_dir if request.param == "clip" else tiny_dual_dir


def test_exact_accumulation_equals_one_batch_of_six_with_dropout(model_dir):
    trainer = make_trainer(model_dir, "exact", micro=2, accum=3)
    batches = make_batches(trainer, [2, 2, 2])
    rng = _RngReplay(trainer.device)
    loss = trainer.train_step(batches)
    got = lora_grads(trainer)
    rng.restore()
    expected_loss, expected = reference_step(trainer, batches)
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert_grads_close(got, expected)


def test_dropout_is_active_and_replay_is_what_makes_exact_match(tiny_clip_dir, monkeypatch):
    trainer = make_trainer(tiny_clip_dir, "exact", micro=2, accum=3)
    batches = make_batches(trainer, [2, 2, 2])
    pixels, ids, mask, _ = trainer._inputs(batches[0])
    with torch.no_grad():
        first, second = trainer.model(pixels, ids, mask)[0], trainer.model(pixels, ids, mask)[0]
    assert not torch.allclose(first, second), "LoRA dropout should make two encodes differ"
    monkeypatch.setattr(_RngReplay, "restore", lambda self: None)  # no replay: fresh masks on re-encode
    rng = torch.get_rng_state()
    trainer.train_step(batches)
    got = lora_grads(trainer)
    torch.set_rng_state(rng)
    _, expected = reference_step(trainer, batches)
    assert any((got[n] - expected[n]).abs().max() > 1e-3 * expected[n].abs().max() for n in got)


def test_exact_accumulation_without_dropout_equals_a_single_forward_of_six(tiny_clip_dir):
    trainer = make_trainer(tiny_clip_dir, "exact", micro=2, accum=3, dropout=0.0)
    trainer.train_step(make_batches(trainer, [2, 2, 2]))
    got = lora_grads(trainer)
    trainer.train_step(make_batches(trainer, [6]))  # k=1, m=6: one forward of all six
    assert_grads_close(got, lora_grads(trainer))


def test_exact_accumulation_with_duplicate_images_across_micro_batches(tiny_clip_dir):
    trainer = make_trainer(tiny_clip_dir, "exact", micro=2, accum=3)
    ids = (0, 1, 1, 2, 0, 3)  # image 1 straddles micro-batches 0/1, image 0 is in 0 and 2
    batches = make_batches(trainer, [2, 2, 2], ids)
    rng = _RngReplay(trainer.device)
    trainer.train_step(batches)
    got = lora_grads(trainer)
    rng.restore()
    _, expected = reference_step(trainer, batches)
    assert_grads_close(got, expected)


def test_plain_accumulation_is_the_mean_of_micro_batch_losses(tiny_clip_dir):
    trainer = make_trainer(tiny_clip_dir, "plain", micro=2, accum=3)
    batches = make_batches(trainer, [2, 2, 2])
    rng = _RngReplay(trainer.device)
    loss = trainer.train_step(batches)
    got = lora_grads(trainer)
    rng.restore()
    per_micro = []
    for batch in batches:
        pixels, ids, mask, image_ids = trainer._inputs(batch)
        image, text = trainer.model(pixels, ids, mask)
        per_micro.append(trainer.loss_fn(image, text, trainer.model, image_ids))
    mean = torch.stack(per_micro).mean()
    mean.backward()
    assert torch.allclose(loss, mean.detach(), atol=1e-6)
    assert_grads_close(got, lora_grads(trainer))
    # ...which is a different objective from one batch of six (fewer negatives per row).
    rng.restore()
    big_loss, big = reference_step(trainer, batches)
    assert not torch.allclose(loss, big_loss, atol=1e-3)
    assert any((got[n] - big[n]).abs().max() > 1e-3 * big[n].abs().max() for n in got)


def test_composed_vit_bert_gets_adapters_on_every_linear_layer_of_both_towers(tiny_dual_dir):
    from cliptune.model import load_model

    plain, _ = load_model(load_config(None, {"model.name": str(tiny_dual_dir)}).model)
    expected = {n for n, m in plain.base.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith(("vision_model.", "text_model."))}
    assert any(n.startswith("vision_model.") for n in expected) and any(n.startswith("text_model.") for n in expected)
    trainer = make_trainer(tiny_dual_dir, "exact", micro=2, accum=1)
    adapted = {n.split(".lora_A")[0] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    missing = [n for n in expected if not any(a.endswith("." + n) for a in adapted)]
    assert not missing


@pytest.mark.parametrize("accumulation", ["exact", "plain"])
def test_gradient_checkpointing_changes_memory_not_gradients(model_dir, accumulation):
    """Recomputing activations in backward gives the same gradients (dropout replayed by torch's
    checkpoint RNG handling), for both accumulation modes."""
    results = []
    for checkpointing in (False, True):
        trainer = make_trainer(model_dir, accumulation, micro=2, accum=3, checkpointing=checkpointing)
        assert trainer.model.base.is_activation_checkpointing == checkpointing
        rng = torch.get_rng_state()
        loss = trainer.train_step(make_batches(trainer, [2, 2, 2]))
        torch.set_rng_state(rng)
        results.append((loss, lora_grads(trainer)))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert_grads_close(results[1][1], results[0][1])
