import peft
import pytest
import torch
import transformers

from cliptune.config import ConfigError, LoraSettings, ModelConfig
from cliptune.lora import (
    apply_lora,
    count_parameters,
    load_adapter,
    lora_module_names,
    save_adapter,
    set_adapter_scale,
)
from cliptune.model import RANDOM_VIT_B_32, ContrastiveModel, load_model


def _batch(preprocessing, n=3, size=32):
    torch.manual_seed(1)
    pixels = torch.randn(n, 3, size, size)
    tokens = preprocessing.tokenize(["a dog on the grass", "two cats", "a red bus in the city street"][:n])
    return pixels, tokens["input_ids"], tokens["attention_mask"]


def test_seed_recipe_trains_2_84_percent_of_vit_b_32():
    model = ContrastiveModel(transformers.CLIPModel(transformers.CLIPConfig()), "clip")
    counts = apply_lora(model, LoraSettings())
    assert (counts.trainable, counts.total) == (4_423_680, 155_700_993)
    assert str(counts) == "trainable params: 4,423,680 || all params: 155,700,993 || trainable%: 2.8411"
    vision = sum(p.numel() for n, p in model.net.named_parameters() if p.requires_grad and "vision_model" in n)
    assert vision == 2_654_208
    # PEFT's own count agrees with ours.
    assert model.net.get_nb_trainable_parameters() == (4_423_680, 155_700_993)


def test_random_vit_b_32_model_name_builds_offline():
    model, preprocessing = load_model(ModelConfig(name=RANDOM_VIT_B_32))
    assert preprocessing.image_size == 224 and model.family == "clip"
    assert sum(p.numel() for p in model.parameters()) == 151_277_313


@pytest.mark.parametrize("family_dir", ["tiny_clip_dir", "tiny_siglip_dir"])
def test_lora_model_equals_base_before_training(family_dir, request):
    folder = request.getfixturevalue(family_dir)
    base, preprocessing = load_model(ModelConfig(name=str(folder)))
    tuned, _ = load_model(ModelConfig(name=str(folder)))
    apply_lora(tuned, LoraSettings(r=4, alpha=8, dropout=0.0))
    pixels, ids, mask = _batch(preprocessing)
    base.eval(), tuned.eval()
    with torch.no_grad():
        for a, b in zip(base(pixels, ids, mask), tuned(pixels, ids, mask)):
            torch.testing.assert_close(a, b)  # float-order noise only (SigLIP head: ~1e-7)


@pytest.mark.parametrize("train_scale", [False, True])
def test_only_lora_and_optionally_the_temperature_get_gradients(tiny_clip_dir, train_scale):
    model, preprocessing = load_model(ModelConfig(name=str(tiny_clip_dir)))
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, train_logit_scale=train_scale))
    from cliptune.loss import clip_loss

    pixels, ids, mask = _batch(preprocessing)
    image, text = model(pixels, ids, mask)
    clip_loss(image, text, model.logit_scale.exp()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    allowed = {n for n in with_grad if "lora_" in n} | ({n for n in with_grad if n.endswith("logit_scale")})
    assert with_grad == allowed
    assert any("lora_B" in n for n in with_grad)
    assert any(n.endswith("logit_scale") for n in with_grad) == train_scale
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all("lora_" not in n for n in frozen)


def test_tower_modes_pick_the_right_layers(tiny_clip_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    names = lora_module_names(model, LoraSettings(vision="frozen", text="lora"))
    assert names and all(n.startswith("text_model.") for n in names)
    assert len(names) == 2 * 6  # 2 layers x q k v out fc1 fc2
    apply_lora(model, LoraSettings(vision="full", text="frozen", r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vision_model" in n for n in trainable)


def test_siglip_pooling_head_attention_is_not_adapted(tiny_siglip_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_siglip_dir)))
    names = lora_module_names(model, LoraSettings())
    assert not any(".head.attention." in n for n in names)  # nn.MultiheadAttention reads out_proj.weight directly
    assert any(".head.mlp." in n for n in names)


def test_bad_targets_are_refused(tiny_clip_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    with pytest.raises(ConfigError, match="none of"):
        apply_lora(model, LoraSettings(target_modules=["query"]))


def test_dora_and_rslora_switches_reach_peft(tiny_clip_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    apply_lora(model, LoraSettings(r=4, use_dora=True, use_rslora=True))
    config = model.net.peft_config["default"]
    assert config.use_dora and config.use_rslora


def test_adapter_round_trips_through_plain_peft(tiny_clip_dir, tmp_path):
    model, preprocessing = load_model(ModelConfig(name=str(tiny_clip_dir)))
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, train_logit_scale=True))
    with torch.no_grad():  # pretend training moved the adapter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        model.logit_scale.add_(0.5)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    pixels, ids, mask = _batch(preprocessing)
    model.eval()
    with torch.no_grad():
        expected_image = model.encode_images(pixels)
        expected_text = model.encode_texts(ids, mask)
    # Plain transformers + plain PEFT, no cliptune code.
    plain = peft.PeftModel.from_pretrained(transformers.CLIPModel.from_pretrained(str(tiny_clip_dir)),
                                           str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.get_image_features(pixel_values=pixels).pooler_output, expected_image)
        torch.testing.assert_close(plain.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
                                   expected_text)
    # cliptune's loader also restores the trained temperature.
    again, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    load_adapter(again, tmp_path / "adapter")
    torch.testing.assert_close(again.logit_scale, model.logit_scale)


def test_adapter_scale_zero_is_zero_shot_and_one_is_fine_tuned(tiny_clip_dir):
    model, preprocessing = load_model(ModelConfig(name=str(tiny_clip_dir)))
    base, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    apply_lora(model, LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    pixels, _, _ = _batch(preprocessing)
    model.eval(), base.eval()
    with torch.no_grad():
        tuned = model.encode_images(pixels)
        set_adapter_scale(model, 0.0)
        torch.testing.assert_close(model.encode_images(pixels), base.encode_images(pixels))
        set_adapter_scale(model, 0.5)
        half = model.encode_images(pixels)
        set_adapter_scale(model, 1.0)
        torch.testing.assert_close(model.encode_images(pixels), tuned)
    assert not torch.allclose(half, tuned)


def test_adapter_for_another_base_is_refused(tiny_clip_dir, tmp_path, tokenizer):
    from conftest import save_tiny_clip

    model, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    apply_lora(model, LoraSettings(r=4))
    save_adapter(model, tmp_path / "adapter")
    other_dir = tmp_path / "other"
    import transformers as tf

    cfg = tf.CLIPConfig(text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4),
                        vision_config=dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8), projection_dim=16)
    tf.CLIPModel(cfg).save_pretrained(other_dir)
    tokenizer.save_pretrained(other_dir)
    other, _ = load_model(ModelConfig(name=str(other_dir)))
    with pytest.raises(ConfigError, match="does not fit"):
        load_adapter(other, tmp_path / "adapter")
    assert save_tiny_clip  # the helper the fixtures use is importable for ad-hoc models


def test_count_parameters_counts_requires_grad():
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    counts = count_parameters(layer)
    assert (counts.trainable, counts.total) == (6, 8)
