"""FastDropout: the drop rate and expectation of inverted dropout, replayable, swappable into PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cliptune.dropout import FastDropout, keep_mask, quantized_drop_probability


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


def test_use_fast_dropout_swaps_every_lora_dropout(tiny_clip_dir):
    from cliptune.config import load_config
    from cliptune.lora import apply_lora, use_fast_dropout
    from cliptune.model import load_model

    config = load_config(None, {"model.name": str(tiny_clip_dir), "lora.dropout": 0.1})
    model, _ = load_model(config.model)
    apply_lora(model, config.lora)  # fast_dropout defaults to on
    fast = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(fast) == 2 * 2 * 6  # 2 towers x 2 layers x q/k/v/out_proj/fc1/fc2
    assert not any(type(m) is nn.Dropout and m.p == 0.1 for n, m in model.named_modules() if "lora_dropout" in n)
    assert use_fast_dropout(model, False) == 24
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    assert use_fast_dropout(model, True) == 24
