"""Exact (GradCache) accumulation gives one big batch's gradients; plain accumulation is the mean of
micro-batch losses. `accumulate_gradients` is run on its own: on toy towers (pure torch, no Trainer)
and on tiny CLIP / composed ViT+BERT models as `Trainer.setup_model` builds them, with LoRA dropout on."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cliptune.config import load_config
from cliptune.training.accumulation import MicroBatch, _RngReplay, accumulate_gradients
from cliptune.training.loss import clip_loss
from cliptune.training.recipe import Trainer

TEXTS = ["a red circle", "a blue square", "a photo of a dog", "red square", "a blue dog", "a circle photo"]
CPU = torch.device("cpu")


def assert_grads_close(got: dict, expected: dict, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding: the largest difference is tiny next to the tensor's largest entry."""
    assert got.keys() == expected.keys()
    for name in got:
        scale = expected[name].abs().max().clamp_min(1e-6)
        assert (got[name] - expected[name]).abs().max() <= tol * scale, name


def take_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads
    model.zero_grad(set_to_none=True)
    return grads


def reference_step(encode, loss, batches) -> torch.Tensor:
    """One autograd graph over all pairs: each micro-batch encoded with gradients in turn (so the dropout
    masks are drawn from the same RNG stream as accumulation's first pass), one loss, one backward."""
    images, texts = zip(*(encode(pixels, ids, mask) for pixels, ids, mask, _ in batches))
    total = loss(torch.cat(images), torch.cat(texts), torch.cat([b.image_ids for b in batches]))
    total.backward()
    return total.detach()


# -- toy towers: the accumulation function alone -------------------------------------------------------


class ToyTowers(torch.nn.Module):
    """An image tower (linear on the pixels) and a text tower (mean of token embeddings), dropout in both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(12, 8))
        self.tokens = torch.nn.Embedding(20, 8)
        self.text = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(8, 8))

    def forward(self, pixels, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.tokens(input_ids) * mask).sum(1) / mask.sum(1)
        return self.image(pixels), self.text(pooled)


def toy_batches(sizes: list[int], ids: tuple[int, ...]) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(sum(sizes), 3, 2, 2, generator=g)
    tokens = torch.randint(0, 20, (sum(sizes), 5), generator=g)
    mask = torch.ones_like(tokens)
    mask[::2, 3:] = 0  # captions of different lengths
    batches, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        batches.append(MicroBatch(pixels[rows], tokens[rows], mask[rows], torch.tensor(ids[rows])))
        start += n
    return batches


def toy_loss(image, text, image_ids):
    return clip_loss(image, text, torch.tensor(10.0), image_ids)


@pytest.mark.parametrize("sizes, ids", [([2, 2, 2], (0, 1, 2, 3, 4, 5)), ([1, 3, 2], (0, 1, 1, 2, 0, 3))])
def test_exact_step_of_toy_towers_equals_one_big_batch(sizes, ids):
    model = ToyTowers().train()
    batches = toy_batches(sizes, ids)
    rng = _RngReplay(CPU)
    loss = accumulate_gradients(batches, model, toy_loss, exact=True, device=CPU)
    got = take_grads(model)
    rng.restore()
    assert torch.allclose(loss, reference_step(model, toy_loss, batches), atol=1e-6)
    assert_grads_close(got, take_grads(model))


def test_plain_step_of_toy_towers_is_the_mean_of_micro_batch_losses():
    model = ToyTowers().train()
    batches = toy_batches([2, 2, 2], (0, 1, 2, 3, 4, 5))
    rng = _RngReplay(CPU)
    loss = accumulate_gradients(batches, model, toy_loss, exact=False, device=CPU)
    got = take_grads(model)
    rng.restore()
    per_micro = torch.stack([toy_loss(*model(pixels, ids, mask), image_ids)
                             for pixels, ids, mask, image_ids in batches])
    per_micro.mean().backward()
    assert torch.allclose(loss, per_micro.mean().detach(), atol=1e-6)
    assert_grads_close(got, take_grads(model))


@pytest.mark.parametrize("exact", [True, False])
def test_scale_multiplies_the_gradients_and_all_but_the_last_backward_skip_the_sync(exact):
    """`scale` (fp16's loss scaler) scales every gradient once; `no_sync` (DDP) wraps each micro-batch's
    backward but the last, so the all-reduce runs once per step."""
    model = ToyTowers().eval()  # no dropout: two runs see the same features
    batches = toy_batches([2, 2, 2], (0, 1, 2, 3, 4, 5))
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(True)
        yield

    accumulate_gradients(batches, model, toy_loss, exact=exact, device=CPU)
    plain = take_grads(model)
    accumulate_gradients(batches, model, toy_loss, exact=exact, device=CPU, scale=lambda t: t * 8.0, no_sync=no_sync)
    assert_grads_close(take_grads(model), {n: g * 8.0 for n, g in plain.items()})
    assert len(entered) == len(batches) - 1


# -- tiny CLIP and composed dual encoder, LoRA dropout on ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dual_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel

    from cliptune.models.dual_encoder import compose_dual_encoder, save_composed

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


@pytest.fixture(params=["clip", "dual"])
def model_dir(request, tiny_clip_dir, tiny_dual_dir):
    return tiny_clip_dir if request.param == "clip" else tiny_dual_dir


def make_trainer(model_dir, dropout: float = 0.2, checkpointing: bool = False) -> Trainer:
    """A Trainer with only its model set up: the model, its preprocessing and loss as a run builds them."""
    config = load_config(None, {"model.name": str(model_dir), "train.device": "cpu", "lora.r": 4,
                                "lora.dropout": dropout, "train.gradient_checkpointing": checkpointing})
    trainer = Trainer(config, progress=False)
    trainer.setup_model()
    # LoRA's B starts at zero, which would make the LoRA branch (and its dropout) invisible in the
    # outputs; give it values, as after some training, so dropout changes the features.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    trainer.model.train()
    return trainer


def make_batches(trainer: Trainer, sizes: list[int], ids=(0, 1, 2, 3, 4, 5)) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(1)
    size = trainer.preprocessing.image_size
    pixels = torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8, generator=g)
    batches, start = [], 0
    for n in sizes:
        tokens = trainer.preprocessing.tokenize(TEXTS[start: start + n])
        loaded = {"pixels": pixels[start: start + n], "input_ids": tokens["input_ids"],
                  "attention_mask": tokens["attention_mask"], "image_ids": torch.tensor(ids[start: start + n])}
        batches.append(MicroBatch.on_device(loaded, trainer.preprocessing, CPU))
        start += n
    return batches


def loss_of(trainer: Trainer):
    return lambda image, text, image_ids: trainer.loss_fn(image, text, trainer.model, image_ids)


def step(trainer: Trainer, batches: list[MicroBatch], exact: bool = True) -> torch.Tensor:
    return accumulate_gradients(batches, trainer.model, loss_of(trainer), exact=exact, device=CPU)


def lora_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    grads = take_grads(trainer.model)
    assert any("lora_" in n for n in grads)
    return grads


@pytest.mark.parametrize("ids", [(0, 1, 2, 3, 4, 5), (0, 1, 1, 2, 0, 3)], ids=["distinct", "duplicates"])
def test_exact_accumulation_equals_one_batch_of_six_with_dropout(model_dir, ids):
    """With `duplicates`, image 1 straddles micro-batches 0/1 and image 0 is in 0 and 2."""
    trainer = make_trainer(model_dir)
    batches = make_batches(trainer, [2, 2, 2], ids)
    rng = _RngReplay(CPU)
    loss = step(trainer, batches)
    got = lora_grads(trainer)
    rng.restore()
    expected_loss = reference_step(trainer.model, loss_of(trainer), batches)
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert_grads_close(got, lora_grads(trainer))


def test_dropout_is_active_and_replay_is_what_makes_exact_match(tiny_clip_dir, monkeypatch):
    trainer = make_trainer(tiny_clip_dir)
    batches = make_batches(trainer, [2, 2, 2])
    pixels, ids, mask, _ = batches[0]
    with torch.no_grad():
        first, second = trainer.model(pixels, ids, mask)[0], trainer.model(pixels, ids, mask)[0]
    assert not torch.allclose(first, second), "LoRA dropout should make two encodes differ"
    monkeypatch.setattr(_RngReplay, "restore", lambda self: None)  # no replay: fresh masks on re-encode
    rng = torch.get_rng_state()
    step(trainer, batches)
    got = lora_grads(trainer)
    torch.set_rng_state(rng)
    reference_step(trainer.model, loss_of(trainer), batches)
    expected = lora_grads(trainer)
    assert any((got[n] - expected[n]).abs().max() > 1e-3 * expected[n].abs().max() for n in got)


def test_exact_accumulation_without_dropout_equals_a_single_forward_of_six(tiny_clip_dir):
    trainer = make_trainer(tiny_clip_dir, dropout=0.0)
    step(trainer, make_batches(trainer, [2, 2, 2]))
    got = lora_grads(trainer)
    step(trainer, make_batches(trainer, [6]))  # k=1, m=6: one forward of all six
    assert_grads_close(got, lora_grads(trainer))


def test_plain_accumulation_is_the_mean_of_micro_batch_losses(tiny_clip_dir):
    trainer = make_trainer(tiny_clip_dir)
    batches = make_batches(trainer, [2, 2, 2])
    rng = _RngReplay(CPU)
    loss = step(trainer, batches, exact=False)
    got = lora_grads(trainer)
    rng.restore()
    per_micro = [loss_of(trainer)(*trainer.model(pixels, ids, mask), image_ids)
                 for pixels, ids, mask, image_ids in batches]
    mean = torch.stack(per_micro).mean()
    mean.backward()
    assert torch.allclose(loss, mean.detach(), atol=1e-6)
    assert_grads_close(got, lora_grads(trainer))
    # ...which is a different objective from one batch of six (fewer negatives per row).
    rng.restore()
    big_loss = reference_step(trainer.model, loss_of(trainer), batches)
    big = lora_grads(trainer)
    assert not torch.allclose(loss, big_loss, atol=1e-3)
    assert any((got[n] - big[n]).abs().max() > 1e-3 * big[n].abs().max() for n in got)


def test_composed_vit_bert_gets_adapters_on_every_linear_layer_of_both_towers(tiny_dual_dir):
    from cliptune.models.contrastive import load_model

    plain, _ = load_model(load_config(None, {"model.name": str(tiny_dual_dir)}).model)
    expected = {n for n, m in plain.base.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith(("vision_model.", "text_model."))}
    assert any(n.startswith("vision_model.") for n in expected) and any(n.startswith("text_model.") for n in expected)
    trainer = make_trainer(tiny_dual_dir)
    adapted = {n.split(".lora_A")[0] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    missing = [n for n in expected if not any(a.endswith("." + n) for a in adapted)]
    assert not missing


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "plain"])
def test_gradient_checkpointing_changes_memory_not_gradients(model_dir, exact):
    """Recomputing activations in backward gives the same gradients (dropout replayed by torch's
    checkpoint RNG handling), for both accumulation modes."""
    results = []
    for checkpointing in (False, True):
        trainer = make_trainer(model_dir, checkpointing=checkpointing)
        assert trainer.model.base.is_activation_checkpointing == checkpointing
        rng = torch.get_rng_state()
        loss = step(trainer, make_batches(trainer, [2, 2, 2]), exact=exact)
        torch.set_rng_state(rng)
        results.append((loss, lora_grads(trainer)))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert_grads_close(results[1][1], results[0][1])
