"""Export: merged == base + adapter through plain transformers; ONNX == PyTorch; int8 runs; model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import save_tiny_dual
from PIL import Image

from cliptune.config import LoraSettings, ModelConfig
from cliptune.deploy.embedders import OnnxEmbedder, TorchEmbedder
from cliptune.deploy.export import export_model, measure_quantization
from cliptune.models.contrastive import load_model
from cliptune.models.lora import apply_lora, load_merged_model, save_adapter


def save_random_adapter(base: str, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter with non-zero B (a fresh one is the identity) and perturbed trained heads."""
    model, _ = load_model(ModelConfig(name=base))
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.net.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def tiny_dual_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_dual(tmp_path_factory.mktemp("tiny-dual"), tokenizer)


@pytest.fixture(scope="module")
def bases(tiny_clip_dir, tiny_siglip_dir, tiny_dual_dir) -> dict[str, Path]:
    return {"clip": tiny_clip_dir, "siglip": tiny_siglip_dir, "dual": tiny_dual_dir}


def _inputs(preprocessing, n: int = 3):
    torch.manual_seed(2)
    size = preprocessing.image_size
    pixels = torch.randn(n, 3, size, size)
    tokens = preprocessing.tokenize(["a dog", "two red cars parked by a very big house near the sea", "sky"][:n])
    return pixels, tokens["input_ids"], tokens["attention_mask"]


@pytest.mark.parametrize("family", ["clip", "siglip", "dual"])
def test_merged_model_matches_base_plus_adapter_in_plain_transformers(family, bases, tmp_path):
    base = str(bases[family])
    adapter = save_random_adapter(base, tmp_path / "adapter")
    reference, preprocessing = load_merged_model(base, None)
    from cliptune.models.lora import load_adapter

    load_adapter(reference, adapter)  # unmerged PeftModel
    pixels, ids, mask = _inputs(preprocessing)
    with torch.no_grad():
        ref_image, ref_text = reference.encode_images(pixels), reference.encode_texts(ids, mask)
        plain_base, _ = load_model(ModelConfig(name=base))
        base_image = plain_base.encode_images(pixels)
    # compare directions too: a random EfficientNet's raw features are tiny (~1e-10)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    assert (unit(base_image) - unit(ref_image)).abs().max() > 1e-3, "adapter must change the model"

    export_model(base, tmp_path / "merged", adapter=adapter)
    if family == "dual":
        import cliptune.models.dual_encoder  # noqa: F401  registers the model type with AutoModel
    model_class = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel,
                   "dual": transformers.AutoModel}[family]
    merged = model_class.from_pretrained(str(tmp_path / "merged")).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        image = merged.get_image_features(pixel_values=pixels)
        text = merged.get_text_features(input_ids=ids, attention_mask=mask)
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    assert (image - ref_image).abs().max() < 1e-5 and (unit(image) - unit(ref_image)).abs().max() < 1e-5
    assert (text - ref_text).abs().max() < 1e-5 and (unit(text) - unit(ref_text)).abs().max() < 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert tokenizer("a dog")["input_ids"] == preprocessing.tokenizer("a dog")["input_ids"]
    # Every family's export has the preprocessor_config.json docs/deploy.md lists (the dual encoder's too).
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "merged"))
    assert tuple(processor.image_mean) == pytest.approx(preprocessing.image_mean)
    assert processor.crop_size == {"height": preprocessing.image_size, "width": preprocessing.image_size} \
        or processor.size == {"height": preprocessing.image_size, "width": preprocessing.image_size}


@pytest.fixture(scope="module", params=["clip", "siglip"])
def onnx_export(request, bases, tmp_path_factory):
    base = str(bases[request.param])
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    adapter = save_random_adapter(base, root / "run" / "adapter")
    (root / "run" / "metrics.json").write_text(json.dumps(
        {"zero-shot": {"text_to_image_R@1": 10.0, "image_to_text_R@1": 12.0},
         "fine-tuned": {"text_to_image_R@1": 30.0, "image_to_text_R@1": 33.0}}))
    result = export_model(base, root / "out", adapter=adapter, onnx=True, quantize=True)
    return base, adapter, result


def test_onnx_matches_torch(onnx_export):
    base, adapter, result = onnx_export
    torch_embedder = TorchEmbedder(base, adapter)
    onnx_embedder = OnnxEmbedder(result.out_dir / "onnx")
    for n in (1, 3):
        images = [Image.new("RGB", (40 + 9 * i, 37 + 5 * i), (30 * i, 200 - 40 * i, 90)) for i in range(n)]
        assert np.abs(torch_embedder.embed_images(images) - onnx_embedder.embed_images(images)).max() < 1e-4
        for texts in (["dog"] * n, ["a long caption about two dogs running on a sandy beach at dawn"] * n):
            assert np.abs(torch_embedder.embed_texts(texts) - onnx_embedder.embed_texts(texts)).max() < 1e-4
    # the raw sessions too: what a user of onnxruntime alone sees
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.out_dir / "onnx" / "image_encoder.onnx"))
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(torch_embedder.model.encode_images(torch.from_numpy(pixels)), dim=-1)
    assert np.abs(session.run(None, {"pixel_values": pixels})[0] - expected.numpy()).max() < 1e-4


def test_quantized_encoders_run(onnx_export):
    _, _, result = onnx_export
    fp32, int8 = OnnxEmbedder(result.out_dir, quantized=False), OnnxEmbedder(result.out_dir, quantized=True)
    texts = ["a dog", "a red car by the sea"]
    a, b = fp32.embed_texts(texts), int8.embed_texts(texts)
    assert b.shape == a.shape and np.isfinite(b).all()
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() > 0.9  # int8 is close to fp32, not equal
    images = [Image.new("RGB", (33, 45), (200, 20, 20))]
    assert int8.embed_images(images).shape == (1, fp32.dim)


def test_model_card_front_matter_lora_and_metrics(onnx_export):
    base, _, result = onnx_export
    card = (result.out_dir / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "- lora" in front
    # A local folder is no hub id: the hub's base_model field is left out, the card names the folder in full.
    assert "base_model" not in front and f"`{Path(base).resolve()}` (a local folder)" in card
    assert "| r | 4 |" in card and "| fine-tuned |" in card and "30.00" in card
    assert "onnxruntime" in card
    assert {"model.safetensors", "onnx/image_encoder.onnx", "onnx/text_encoder.int8.onnx",
            "onnx/preprocessing.json"} <= set(result.files)


def _distinct_photos(root: Path, n: int = 12) -> list:
    """Records whose images all differ after resizing (flat colours tie exactly, and R@1 then
    depends on how ties break), each with two different captions."""
    from cliptune.data.readers import ImageCaptions

    rng = np.random.default_rng(0)
    words = "dog cat red blue car tree sea house sky green bird boat".split()
    records = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((48, 40), Image.NEAREST).save(path)
        captions = tuple(" ".join(rng.choice(words, size=2 + j)) for j in range(2))
        records.append(ImageCaptions(str(i), path, captions))
    return records


def test_measure_quantization(onnx_export, tmp_path):
    _, _, result = onnx_export
    records = _distinct_photos(tmp_path / "photos")
    report = measure_quantization(result.out_dir / "onnx", records, batch_size=4)
    # Each encoder's R@1 recomputed here by brute force on its own embeddings: a caption hits when its
    # image scores highest; an image hits when its best caption is one of its own.
    texts = [caption for record in records for caption in record.captions]
    owner = np.array([i for i, record in enumerate(records) for _ in record.captions])
    embedded = {}
    for quantized, metrics in ((False, report.fp32), (True, report.int8)):
        embedder = OnnxEmbedder(result.out_dir / "onnx", quantized=quantized, batch_size=4)
        image, text = embedder.embed_images([r.image_path for r in records]), embedder.embed_texts(texts)
        embedded[quantized] = image, text
        similarity = text @ image.T  # (n_texts, n_images)
        assert metrics["text_to_image_R@1"] == pytest.approx(100 * np.mean(similarity.argmax(1) == owner), abs=1e-4)
        assert metrics["image_to_text_R@1"] == pytest.approx(
            100 * np.mean(owner[similarity.argmax(0)] == np.arange(len(records))), abs=1e-4)
    # int8 is close to fp32 on the same data, embedding by embedding (cosine; measured >= 0.9989 on
    # these tiny models) and in R@1: at most one image's worth (8.3 points, two captions) apart.
    for fp32, int8 in zip(embedded[False], embedded[True]):
        assert (fp32 * int8).sum(axis=1).min() > 0.99
    for name in ("image_to_text_R@1", "text_to_image_R@1"):
        assert abs(report.delta(name)) <= 100 / len(records) + 1e-6, report.describe()
    assert report.speedup == pytest.approx(report.fp32_seconds / report.int8_seconds)
    assert (f"text_to_image_R@1 {report.fp32['text_to_image_R@1']:.2f} -> {report.int8['text_to_image_R@1']:.2f}"
            in report.describe())


def test_export_cli(tiny_clip_dir, tmp_path, capsys):
    from cliptune.apps.cli import main

    adapter = save_random_adapter(str(tiny_clip_dir), tmp_path / "adapter")
    assert main(["export", "--model.name", str(tiny_clip_dir), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--onnx"]) == 0
    assert (tmp_path / "out" / "onnx" / "text_encoder.onnx").is_file()
    assert "MB" in capsys.readouterr().out
    assert main(["export", "--model.name", str(tiny_clip_dir), "--out", str(tmp_path / "o2"), "--int8"]) == 2


def _card(tmp_path: Path, base: str, family: str, run_config: str | None, metrics: dict | None) -> str:
    from cliptune.deploy.export import write_model_card

    adapter = tmp_path / "runs" / "r1" / "adapter"
    adapter.mkdir(parents=True)
    if run_config is not None:
        (adapter.parent / "config.yaml").write_text(run_config, encoding="utf-8")
    out = tmp_path / "export"
    out.mkdir()
    return write_model_card(out, base, family, adapter, metrics, onnx=False, quantized=False).read_text()


RUN_CONFIG = """model: {name: openai/clip-vit-base-patch32}
data: {path: data/flickr30k/flickr_annotations_30k.csv, format: auto, image_root: null, train_split: train,
       val_split: val, captions: sample, max_images: null}
train: {epochs: 3, micro_batch_size: 8, grad_accum_steps: 4, accumulation: exact, lr: 0.0001, schedule: cosine,
        warmup_ratio: 0.05, weight_decay: 0.0, seed: 0}
"""


@pytest.mark.parametrize("family, says", [("clip", "A CLIP dual encoder"), ("siglip", "A SigLIP dual encoder"),
                                          ("dual", "A dual encoder composed from a pretrained vision backbone")])
def test_model_card_describes_the_model_the_base_and_the_training_data(tmp_path, monkeypatch, family, says):
    monkeypatch.chdir(tmp_path)  # no local folder named like the hub id
    metrics = {"zero-shot": {"image_to_text_R@1": 1.0, "rsum": 9.0}, "fine-tuned": {"image_to_text_R@1": 5.0,
                                                                                   "rsum": 20.0}}
    card = _card(tmp_path, "openai/clip-vit-base-patch32", family, RUN_CONFIG, metrics)
    front, body = card.split("---")[1], card.split("---", 2)[2]
    assert "base_model: openai/clip-vit-base-patch32" in front.splitlines()
    assert says in body and "dual dual" not in card
    assert "https://github.com/)" not in card  # no placeholder link
    assert "[`openai/clip-vit-base-patch32`](https://huggingface.co/openai/clip-vit-base-patch32)" in body
    data = body.split("## Training data")[1].split("##")[0]
    assert "`data/flickr30k/flickr_annotations_30k.csv` (auto)" in data
    assert "trained on `train`, scored on `val`" in data and "8 x 4 pairs (exact accumulation)" in data
    assert "| fine-tuned | 5.00 | 20.00 |" in body


def test_model_card_with_a_local_base_and_no_run_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai" / "clip-vit-base-patch32").mkdir(parents=True)  # a local folder named like a hub id
    card = _card(tmp_path, "openai/clip-vit-base-patch32", "clip", None, None)
    assert "base_model" not in card.split("---")[1]
    assert f"`{tmp_path / 'openai' / 'clip-vit-base-patch32'}` (a local folder)" in card
    assert "Not recorded: no config.yaml beside the adapter (`r1/`)" in card
    for base in ("random:clip-vit-b-32", "../models/x"):
        assert "base_model" not in _card(tmp_path / base.replace("/", "_"), base, "clip", None, None).split("---")[1]


def test_model_card_reads_cliptune_eval_metrics(tmp_path):
    metrics = {"results": {"base": {"text_to_image_R@1": 2.0}, "run-a": {"text_to_image_R@1": 7.5}},
               "images_scored": 50, "captions_scored": 250, "skipped": []}
    card = _card(tmp_path, "org/model", "siglip", RUN_CONFIG, metrics)
    assert "| run-a | 7.50 |" in card and "| base | 2.00 |" in card
    assert "50 images, 250 captions" in card
