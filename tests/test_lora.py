import peft
import pytest
import torch
import transformers

from cliptune.config import ConfigError, LoraSettings, ModelConfig
from cliptune.models.contrastive import RANDOM_VIT_B_32, ContrastiveModel, load_model
from cliptune.models.lora import (
    apply_lora,
    count_parameters,
    load_adapter,
    lora_module_names,
    save_adapter,
    set_adapter_scale,
)


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
    from cliptune.training.loss import clip_loss

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
    model, preprocessing = load_model(ModelConfig(name=str(tiny_clip_dir)))
    apply_lora(model, LoraSettings(r=4))
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the model
        for name, param in model.net.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
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
    with pytest.raises(ConfigError, match="does not fit") as refused:
        load_adapter(other, tmp_path / "adapter")
    assert str(tmp_path / "adapter") in str(refused.value)  # the message names the adapter
    # The same adapter does load into the base it was made for: the refusal is about the base.
    own, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    pixels, ids, mask = _batch(preprocessing)
    model.eval()
    with torch.no_grad():
        base_text = own.encode_texts(ids, mask)
        load_adapter(own, tmp_path / "adapter")
        own.eval()
        assert torch.allclose(own.encode_texts(ids, mask), model.encode_texts(ids, mask), atol=1e-6)
        assert torch.allclose(own.encode_images(pixels), model.encode_images(pixels), atol=1e-6)
        assert not torch.allclose(own.encode_texts(ids, mask), base_text, atol=1e-3)


def test_count_parameters_counts_requires_grad():
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    counts = count_parameters(layer)
    assert (counts.trainable, counts.total) == (6, 8)


# --------------------------------------------------------------------------------------------------
# Every kind of run: its adapter is plain PEFT, and its scale moves every trained weight (WiSE-FT)
# --------------------------------------------------------------------------------------------------

RUN_KINDS = {
    "lora": {"lora.train_logit_scale": True},
    "heads": {"lora.vision": "frozen", "lora.text": "frozen", "lora.train_projections": True,
              "lora.train_logit_scale": True},
    "heads+lora": {"lora.train_projections": True},
    "full": {"lora.vision": "full", "lora.text": "frozen"},
    "full+lora": {"lora.vision": "full", "lora.text": "lora", "lora.train_logit_scale": True},
    "dual-heads": {"lora.vision": "frozen", "lora.text": "frozen", "lora.train_logit_scale": True},
}


def _save_tiny_dual(out, tokenizer):
    """A composed dual encoder (2-layer, 32-wide ViT + BERT, fresh 16-d heads), saved as a model folder."""
    from cliptune.models.dual_encoder import compose_dual_encoder, save_composed

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=37, image_size=32, patch_size=8))
    vit.save_pretrained(out / "vit")
    (out / "vit" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}')
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                          num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=37, max_position_embeddings=64))
    bert.save_pretrained(out / "bert")
    tokenizer.save_pretrained(out / "bert")
    model, tok = compose_dual_encoder(str(out / "vit"), str(out / "bert"), projection_dim=16)
    return save_composed(model, tok, out / "dual")


def _embed(model, pixels, ids, mask):
    model.eval()
    with torch.no_grad():
        return model.encode_images(pixels), model.encode_texts(ids, mask)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_clip_dir, tokenizer):
    """One tiny run of each kind: 3 steps at lr 0.05, so every trained weight really moves. Returns
    kind -> (base model folder, adapter folder, the in-memory fine-tuned embeddings of `_batch`)."""
    from conftest import make_image_folder_dataset

    from cliptune.config import load_config
    from cliptune.training.recipe import Trainer

    root = tmp_path_factory.mktemp("runs")
    data = make_image_folder_dataset(root / "data", n_images=12)
    dual_dir = _save_tiny_dual(root / "dual-model", tokenizer)
    runs = {}
    for kind, settings in RUN_KINDS.items():
        model_dir = dual_dir if kind.startswith("dual") else tiny_clip_dir
        config = load_config(None, {
            "model.name": str(model_dir), "data.path": str(data), "train.output_dir": str(root / kind),
            "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0, "train.micro_batch_size": 4,
            "train.grad_accum_steps": 1, "train.max_steps": 3, "train.lr": 0.05, "train.warmup_ratio": 0.0,
            "train.report": False, "train.save_every": 0, "data.num_workers": 0, **settings})
        trainer = Trainer(config, progress=False)
        trainer.setup()
        trainer.train()
        pixels, ids, mask = _batch(trainer.preprocessing)
        runs[kind] = (model_dir, root / kind / "adapter", _embed(trainer.model, pixels, ids, mask),
                      float(trainer.model.logit_scale.detach()))
    return runs


@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_scale_moves_every_trained_weight_from_zero_shot_to_fine_tuned(trained_runs, kind):
    model_dir, adapter, trained, _ = trained_runs[kind]
    base, preprocessing = load_model(ModelConfig(name=str(model_dir)))
    inputs = _batch(preprocessing)
    zero_shot = _embed(base, *inputs)
    model, _ = load_model(ModelConfig(name=str(model_dir)))
    load_adapter(model, adapter)
    fine_tuned = _embed(model, *inputs)
    for got, expected in zip(fine_tuned, trained):
        torch.testing.assert_close(got, expected)  # the saved adapter is what training produced
    moved = [not torch.equal(a, b) for a, b in zip(zero_shot, fine_tuned)]
    assert any(moved), "training did not move the embeddings: the test would prove nothing"
    tuned_scale = model.logit_scale.detach().clone()

    set_adapter_scale(model, 0.0)
    for got, expected in zip(_embed(model, *inputs), zero_shot):
        assert torch.equal(got, expected)  # exactly the base model, heads and towers included
    assert torch.equal(model.logit_scale, base.logit_scale)
    set_adapter_scale(model, 0.5)
    half = _embed(model, *inputs)
    for was_moved, h, a, b in zip(moved, half, zero_shot, fine_tuned):
        if was_moved:
            assert not torch.equal(h, a) and not torch.equal(h, b)
    set_adapter_scale(model, 1.0)
    for got, expected in zip(_embed(model, *inputs), fine_tuned):
        assert torch.equal(got, expected)
    assert torch.equal(model.logit_scale, tuned_scale)


@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_every_run_adapter_loads_with_plain_peft(trained_runs, kind):
    model_dir, adapter, trained, _ = trained_runs[kind]
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    # Plain transformers + plain PEFT, no cliptune code (the composed model type needs registering).
    import cliptune.models.dual_encoder  # noqa: F401

    base_class = transformers.AutoModel if kind.startswith("dual") else transformers.CLIPModel
    plain = peft.PeftModel.from_pretrained(base_class.from_pretrained(str(model_dir)), str(adapter)).eval()
    _, preprocessing = load_model(ModelConfig(name=str(model_dir)))
    pixels, ids, mask = _batch(preprocessing)
    with torch.no_grad():
        image = plain.get_image_features(pixel_values=pixels)
        text = plain.get_text_features(input_ids=ids, attention_mask=mask)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    torch.testing.assert_close(image, trained[0])
    torch.testing.assert_close(text, trained[1])


def test_adapter_written_before_heads_were_peft_still_loads_and_scales(trained_runs, tmp_path):
    from safetensors.torch import save_file

    from cliptune.models.lora import SCALE_FILE

    model_dir, adapter, trained, logit_scale = trained_runs["heads"]
    fine, _ = load_model(ModelConfig(name=str(model_dir)))
    load_adapter(fine, adapter)
    # The old layout: the trained tensors under their model names, beside the temperature file.
    legacy = tmp_path / "old-adapter"
    legacy.mkdir()
    heads = {f"{name}.weight": getattr(fine.base, name).weight.detach().clone()
             for name in ("visual_projection", "text_projection")}
    save_file({**heads, "logit_scale": fine.logit_scale.detach().reshape(())}, str(legacy / "trained_modules.safetensors"))
    (legacy / SCALE_FILE).write_bytes((adapter / SCALE_FILE).read_bytes())

    base, preprocessing = load_model(ModelConfig(name=str(model_dir)))
    inputs = _batch(preprocessing)
    model, _ = load_model(ModelConfig(name=str(model_dir)))
    load_adapter(model, legacy)
    for got, expected in zip(_embed(model, *inputs), trained):
        torch.testing.assert_close(got, expected)
    assert float(model.logit_scale) == pytest.approx(logit_scale)
    set_adapter_scale(model, 0.0)
    for got, expected in zip(_embed(model, *inputs), _embed(base, *inputs)):
        assert torch.equal(got, expected)


def test_training_the_heads_does_not_count_peft_base_copies(tiny_clip_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_clip_dir)))
    total = sum(p.numel() for p in model.parameters())
    counts = apply_lora(model, LoraSettings(vision="frozen", text="frozen", train_projections=True))
    heads = sum(getattr(model.base, n).original_module.weight.numel() for n in ("visual_projection", "text_projection"))
    assert (counts.trainable, counts.total) == (heads, total)
