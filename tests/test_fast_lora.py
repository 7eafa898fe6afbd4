"""cliptune.models.fast_lora: FastDropout is inverted dropout (rate, expectation, replay); FusedLoraLinear computes
PEFT's LoRA forward and gradients; both swap in and out of a PEFT model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cliptune.models.fast_lora import (
    FastDropout,
    FusedLoraLinear,
    keep_mask,
    quantized_drop_probability,
    use_fast_lora,
)


def test_quantized_probability_is_a_multiple_of_one_in_65536():
    assert quantized_drop_probability(0.1) == 6554 / 65536
    assert quantized_drop_probability(0.5) == 0.5 and quantized_drop_probability(0.0) == 0.0


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_drop_rate_matches_p_and_slices_are_independent(p):
    torch.manual_seed(0)
    n = 1 << 22
    kept = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((~kept).float().mean().item() - quantized_drop_probability(p)) < 6 * sigma
    # The 4 entries cut from one 64-bit draw must not be correlated: P(both dropped) = p^2.
    pairs = (~kept).view(-1, 4)
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):
        both = (pairs[:, a] & pairs[:, b]).float().mean().item()
        q = quantized_drop_probability(p)
        assert abs(both - q * q) < 6 * (q * q * (1 - q * q) / (n // 4)) ** 0.5


def test_output_is_unbiased_and_kept_entries_are_scaled():
    torch.manual_seed(1)
    layer = FastDropout(0.1).train()
    x = torch.full((1 << 20,), 3.0)
    out = layer(x)
    kept = out != 0
    assert torch.allclose(out[kept], torch.tensor(3.0 / (1 - quantized_drop_probability(0.1))))
    assert abs(out.mean().item() - 3.0) < 6 * 3.0 * (0.1 / 0.9 / x.numel()) ** 0.5


def test_eval_mode_and_zero_p_are_the_identity():
    x = torch.randn(5, 7)
    assert FastDropout(0.3).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x


def test_same_rng_state_same_mask_and_gradient_is_the_mask():
    layer = FastDropout(0.25).train()
    x = torch.randn(33, 17, requires_grad=True)
    state = torch.get_rng_state()
    first = layer(x)
    torch.set_rng_state(state)
    second = layer(x)
    assert torch.equal(first, second)
    first.sum().backward()
    scale = 1 / (1 - quantized_drop_probability(0.25))
    expected = (first.detach() != 0).float() * scale
    assert torch.allclose(x.grad, expected)


def _lora_model(model_dir, dropout: float = 0.1, **overrides):
    from cliptune.config import load_config
    from cliptune.models.contrastive import load_model
    from cliptune.models.lora import apply_lora

    config = load_config(None, {"model.name": str(model_dir), "lora.dropout": dropout, **overrides})
    model, preprocessing = load_model(config.model)
    apply_lora(model, config.lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B, so the LoRA branch shows in the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return model.train(), preprocessing


def test_use_fast_lora_swaps_every_lora_layer_and_dropout(tiny_clip_dir):
    model, _ = _lora_model(tiny_clip_dir)  # lora.fast_path defaults to on
    n = 2 * 2 * 6  # 2 towers x 2 layers x q/k/v/out_proj/fc1/fc2
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == n
    assert sum(type(m) is FusedLoraLinear for m in model.modules()) == n
    assert use_fast_lora(model, False) == 2 * n
    assert not any(isinstance(m, (FastDropout, FusedLoraLinear)) for m in model.modules())
    assert use_fast_lora(model, True) == 2 * n
    off, _ = _lora_model(tiny_clip_dir, **{"lora.fast_path": False})
    assert not any(isinstance(m, (FastDropout, FusedLoraLinear)) for m in off.modules())


def _forward_backward(model, pixels, ids, mask, seed: int):
    torch.manual_seed(seed)
    image, text = model(pixels, ids, mask)
    ((image * torch.linspace(-1, 1, image.shape[-1])).sum() + (text ** 2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return image.detach(), text.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_forward_and_gradients_equal_pefts_own(tiny_clip_dir, dropout):
    """With the same random state (so the same masks), the fused path gives PEFT's features and LoRA
    gradients to float32 rounding."""
    model, pre = _lora_model(tiny_clip_dir, dropout)
    pixels = torch.randn(3, 3, pre.image_size, pre.image_size)
    tokens = pre.tokenize(["a red square", "two dogs on a beach", "blue"])
    fast = _forward_backward(model, pixels, tokens["input_ids"], tokens["attention_mask"], seed=5)
    use_fast_lora(model, False)
    # PEFT's own modules, with FastDropout's mask put back so the two draw the same mask.
    for module in model.modules():
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
            for key, layer in module.lora_dropout.items():
                if type(layer) is nn.Dropout:
                    module.lora_dropout[key] = FastDropout(layer.p).train()
    reference = _forward_backward(model, pixels, tokens["input_ids"], tokens["attention_mask"], seed=5)
    assert torch.allclose(fast[0], reference[0], atol=1e-5) and torch.allclose(fast[1], reference[1], atol=1e-5)
    assert fast[2].keys() == reference[2].keys() and any("lora_A" in n for n in fast[2])
    for name, grad in reference[2].items():  # the scale is applied at another point: rounding differs
        assert (fast[2][name] - grad).abs().max() <= 1e-4 * grad.abs().max().clamp_min(1e-6), name


def test_fused_layer_falls_back_to_peft_when_it_cannot_fuse(tiny_clip_dir, monkeypatch):
    model, pre = _lora_model(tiny_clip_dir, 0.0)
    layer = next(m for m in model.modules() if type(m) is FusedLoraLinear)
    calls = []
    original = layer.__class__.__mro__[1].forward
    monkeypatch.setattr(layer.__class__.__mro__[1], "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    x = torch.randn(4, layer.in_features)
    fused = layer(x)
    assert not calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert len(calls) == 1
    with torch.no_grad():
        layer.merge()
        merged = layer(x)
    assert len(calls) == 2
    assert torch.allclose(fused, merged, atol=1e-5)  # fused unmerged output = PEFT's merged weights' output
