"""The presets (src/cliptune/configs/*_lora.yaml) and the `random:` shapes they are counted on.

Each `random:` shape must be its hub checkpoint's architecture (its total against open_clip's
published count), its LoRA counts must be PEFT's own count on the same shapes with the seed's
targets, and docs/presets.md's table must hold exactly those numbers and the presets' micro-batch
and learning rate. Every model here is built on the meta device (shapes, no memory), so the
878 M-parameter so400m costs no more than ViT-B/32.
"""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
import torch
import transformers

from cliptune.apps.cli import main
from cliptune.config import ConfigError, LoraSettings, ModelConfig, load_config
from cliptune.data.images import SHORTEST_EDGE_CROP, SQUASH
from cliptune.models.contrastive import OPENAI_CLIP_MEAN, SIGLIP_MEAN, load_model
from cliptune.models.lora import count_adapted_parameters
from cliptune.models.random_shapes import RANDOM_SHAPES

DOC = Path(__file__).resolve().parents[1] / "docs" / "presets.md"

# Each preset and the random: shape with its hub model's architecture; the seed's config first.
PRESETS = {
    "flickr30k_vitb32_lora.yaml": "random:clip-vit-b-32",
    "clip_vitb16_lora.yaml": "random:clip-vit-b-16",
    "clip_vitl14_lora.yaml": "random:clip-vit-l-14",
    "clip_vitl14_336_lora.yaml": "random:clip-vit-l-14-336",
    "siglip_base_patch16_224_lora.yaml": "random:siglip-base-patch16-224",
    "siglip_so400m_patch14_384_lora.yaml": "random:siglip-so400m-patch14-384",
}

# Millions of parameters of the same architectures in open_clip's docs/model_profile.csv (mparams),
# an independent implementation: ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-B-16-SigLIP,
# ViT-SO400M-14-SigLIP-384.
OPEN_CLIP_MPARAMS = {
    "random:clip-vit-b-32": 151.28,
    "random:clip-vit-b-16": 149.62,
    "random:clip-vit-l-14": 427.62,
    "random:clip-vit-l-14-336": 427.94,
    "random:siglip-base-patch16-224": 203.16,
    "random:siglip-so400m-patch14-384": 877.96,
}

# The seed's LoRA targets as PEFT's own full-match regex, written independently of cliptune's layer
# walk: every encoder layer's attention and MLP projections in both towers, and SigLIP's pooling-head
# MLP. Its pooling attention is torch's MultiheadAttention, which reads out_proj.weight directly, so
# an adapter there would never run (cliptune leaves it out).
PEFT_TARGETS = r".*_model\.(encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|head\.mlp\.fc[12])"
SEED_LORA = LoraSettings(r=16, alpha=32, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj",
                                                                      "fc1", "fc2"])


def _meta_base(name: str) -> torch.nn.Module:
    shape = RANDOM_SHAPES[name]
    model_class = transformers.CLIPModel if shape.family == "clip" else transformers.SiglipModel
    with torch.device("meta"):
        return model_class(shape.transformers_config())


@pytest.fixture(scope="module")
def peft_counts() -> dict[str, tuple[int, int, int]]:
    """(model params, trainable, all params) per shape: the base counted by torch, the adapted one by PEFT."""
    counts = {}
    for name in RANDOM_SHAPES:
        base = _meta_base(name)
        total = sum(p.numel() for p in base.parameters())
        adapted = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1,
                                                            target_modules=PEFT_TARGETS))
        counts[name] = (total, *adapted.get_nb_trainable_parameters())
    return counts


def _doc_table() -> dict[str, dict[str, str]]:
    """docs/presets.md's counts table, one row per preset file, keyed by column header."""
    lines = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    header_at = next(i for i, line in enumerate(lines) if line.startswith("| preset"))
    header = [cell.strip() for cell in lines[header_at].strip("|").split("|")]
    rows = {}
    for line in lines[header_at + 2:]:
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_every_random_shape_has_a_preset_and_the_table_lists_each_once():
    assert sorted(PRESETS.values()) == sorted(RANDOM_SHAPES)
    assert sorted(_doc_table()) == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_and_keeps_the_seeds_recipe(preset):
    config = load_config(f"configs/{preset}")
    shape = RANDOM_SHAPES[PRESETS[preset]]
    assert config.model.name == shape.hub_id
    lora = config.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.vision, lora.text) == (16, 32, 0.1, "lora", "lora")
    assert lora.target_modules == SEED_LORA.target_modules
    train = config.train
    assert (train.effective_batch_size, train.accumulation, train.epochs, train.schedule) == (32, "exact", 3, "cosine")
    assert train.loss == "auto"  # SigLIP's sigmoid loss, InfoNCE for CLIP
    assert config.data.path == "data/flickr30k/flickr_annotations_30k.csv"


@pytest.mark.parametrize("name", RANDOM_SHAPES)
def test_random_shape_is_the_published_architecture(name, peft_counts):
    total = peft_counts[name][0]
    assert round(total / 1e6, 2) == OPEN_CLIP_MPARAMS[name]
    if name == "random:clip-vit-b-32":
        assert total == 151_277_313  # the seed's model, /work/shared/REFERENCE.md


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_prints_pefts_counts_and_the_docs_table_holds_them(preset, peft_counts, capsys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data here: the dry run still counts, and says the plan is unreadable
    name = PRESETS[preset]
    assert main(["train", "--config", f"configs/{preset}", "--model.name", name, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    match = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", printed)
    assert match, printed
    trainable, total = _number(match[1]), _number(match[2])
    model_params, peft_trainable, peft_total = peft_counts[name]
    assert (trainable, total) == (peft_trainable, peft_total)
    assert total - trainable == model_params
    row = _doc_table()[preset]
    config = load_config(f"configs/{preset}")
    assert row["hub id"] == config.model.name and row["random: shape"] == name
    assert int(row["image px"]) == RANDOM_SHAPES[name].image_size
    assert (_number(row["model params"]), _number(row["trainable"]), _number(row["all params"])) == \
        (model_params, trainable, total)
    assert row["trainable %"] == match[3] == f"{100 * trainable / total:.4f}"
    assert row["micro-batch x accumulation"] == f"{config.train.micro_batch_size} x {config.train.grad_accum_steps}"
    assert float(row["lr"]) == config.train.lr


def test_seed_preset_trains_2_84_percent():
    row = _doc_table()["flickr30k_vitb32_lora.yaml"]
    assert (row["trainable"], row["all params"], row["trainable %"]) == ("4,423,680", "155,700,993", "2.8411")


def test_dry_run_commands_in_the_docs_are_the_tables():
    """The docs' bash block runs exactly one dry run per table row (tests/test_docs.py executes it)."""
    commands = re.findall(r"^cliptune train --config configs/(\S+) --model\.name (\S+) --dry-run$",
                          DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert dict(commands) == PRESETS


@pytest.mark.parametrize("name", ["random:clip-vit-l-14-336", "random:siglip-so400m-patch14-384"])
def test_random_shape_preprocesses_as_its_family_at_its_size(name):
    model, preprocessing = load_model(ModelConfig(name=name), on_meta=True)
    assert all(p.is_meta for p in model.parameters())
    if model.family == "clip":
        expected = (336, SHORTEST_EDGE_CROP, OPENAI_CLIP_MEAN, 77, False)
    else:
        expected = (384, SQUASH, SIGLIP_MEAN, 64, True)
    assert (preprocessing.image_size, preprocessing.resize_mode, preprocessing.image_mean,
            preprocessing.max_text_length, preprocessing.pad_to_max_length) == expected
    assert preprocessing.resize_size == preprocessing.image_size and preprocessing.resample == 3  # bicubic
    # The offline tokenizer's ids index the checkpoint's own, larger, embedding table.
    assert len(preprocessing.tokenizer) <= model.base.config.text_config.vocab_size


def test_random_siglip_encodes_captions_from_its_offline_tokenizer(monkeypatch):
    """Built with real tensors, a random SigLIP runs: the offline tokenizer's ids fit its embedding
    table, captions are padded to 64, and each pair gives one 768-d embedding per tower. (transformers'
    own initialisation of its 203 M parameters takes 13 s of CPU; values drawn here take 1.5 s.)"""
    monkeypatch.setattr(transformers.SiglipPreTrainedModel, "_init_weights", lambda self, module: None)
    model, preprocessing = load_model(ModelConfig(name="random:siglip-base-patch16-224"))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    tokens = preprocessing.tokenize(["a dog runs on the beach"])
    assert tokens["input_ids"].shape == (1, 64)
    with torch.no_grad():
        image, text = model(torch.randn(1, 3, 224, 224), tokens["input_ids"], tokens["attention_mask"])
    assert image.shape == text.shape == (1, 768) and torch.isfinite(image).all() and torch.isfinite(text).all()


def test_counting_a_hub_model_on_meta_is_refused_and_an_unknown_shape_named(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="only random: models"):
        load_model(ModelConfig(name="openai/clip-vit-base-patch32"), on_meta=True)
    with pytest.raises(ConfigError, match=r"'random:clip-vit-h-14' is not a random shape; known: random:clip-vit-b-32"):
        count_adapted_parameters(ModelConfig(name="random:clip-vit-h-14"), SEED_LORA)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model.name", "random:clip-vit-h-14", "--dry-run"]) == 2
    assert "random:siglip-so400m-patch14-384" in capsys.readouterr().err
