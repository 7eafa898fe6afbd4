"""`cliptune eval` gives the numbers a user gets from plain transformers scored by CLIP_benchmark.

The reference reads coco-mini's COCO JSON itself, runs the model's own image processor
(`AutoImageProcessor`, the PIL one) and tokenizer, takes `get_image_features` /
`get_text_features` (transformers 5: an output object whose `pooler_output` is the projected
embedding), and scores with LAION CLIP_benchmark's `recall_at_k` (copied verbatim in
tests/test_metrics.py). The tiny models' processors resize real photos as CLIP (shortest edge 32 +
centre crop 32) and SigLIP (squash to 32x32) do.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import save_tiny_clip, save_tiny_siglip
from PIL import Image
from test_metrics import clip_benchmark_recalls

from cliptune.apps.cli import main
from cliptune.evaluation.metrics import RECALL_KEYS


@torch.no_grad()
def _transformers_recalls(model_dir, coco_mini, family: str) -> dict[str, float]:
    coco = json.loads((coco_mini / "captions_val.json").read_text(encoding="utf-8"))
    files = [image["file_name"] for image in coco["images"]]
    row = {image["id"]: i for i, image in enumerate(coco["images"])}
    captions = [a["caption"] for a in coco["annotations"]]
    text_image_index = torch.tensor([row[a["image_id"]] for a in coco["annotations"]])

    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    images = [Image.open(coco_mini / "images" / name) for name in files]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    image_emb = model.get_image_features(pixel_values=pixels).pooler_output
    # SigLIP was trained on captions padded to its full context; CLIP pools at the end token.
    padding = "max_length" if family == "siglip" else True
    tokens = tokenizer(captions, padding=padding, truncation=True,
                       max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    text_emb = model.get_text_features(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output
    return clip_benchmark_recalls(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), text_image_index)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_cliptune_eval_equals_transformers_scored_by_clip_benchmark(coco_mini, tokenizer, tmp_path, family):
    save = save_tiny_clip if family == "clip" else save_tiny_siglip
    model_dir = save(tmp_path / family, tokenizer, image_size=32)
    out = tmp_path / "eval"
    assert main(["eval", "--model.name", str(model_dir), "--data.path", str(coco_mini / "captions_{split}.json"),
                 "--split", "val", "--out", str(out)]) == 0
    written = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    (got,) = written["results"].values()  # one model, no adapter: one column
    assert (written["images_scored"], written["captions_scored"]) == (50, 250)
    want = _transformers_recalls(model_dir, coco_mini, family)
    for key in RECALL_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got[key], want[key])
    # Not a vacuous match: a random tiny model still ranks some true pairs above chance.
    assert 0 < sum(want.values()) < 600
