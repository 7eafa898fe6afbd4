"""`cliptune eval`: score a base model, its adapters and adapter scales side by side.

Images are checked once; each variant embeds the split once and is scored with the standard
protocol. An optional labelled image folder measures forgetting as zero-shot classification
accuracy with "a photo of a {}" prompts, before and after, in the same table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cliptune.config import DataConfig, ModelConfig
from cliptune.data import ImageCaptions, read_split
from cliptune.evaluate import embed_images, embed_split, embed_texts, score_embeddings
from cliptune.lora import load_adapter, set_adapter_scale
from cliptune.model import ContrastiveModel, Preprocessing, load_model
from cliptune.pipeline import scan_images
from cliptune.train import resolve_precision

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class EvalRequest:
    model: ModelConfig
    data: DataConfig
    split: str = "val"
    adapters: list[Path] = field(default_factory=list)
    scales: list[float] = field(default_factory=lambda: [1.0])
    classify_folder: Path | None = None
    prompt: str = "a photo of a {}"
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    out_dir: Path | None = None


def read_labelled_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Images under `folder/<class name>/...`: paths, label indices, class names (sub-folder names)."""
    if not folder.is_dir():
        raise ValueError(f"classify folder {folder} does not exist")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"classify folder {folder} needs at least two class sub-folders, found {classes}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    return paths, labels, classes


def zero_shot_accuracy(model: ContrastiveModel, preprocessing: Preprocessing, paths: list[Path], labels: list[int],
                       classes: list[str], device: torch.device, prompt: str, precision: str) -> float:
    """Top-1 accuracy (percent) of classifying each image by its most similar class prompt."""
    records = [ImageCaptions(str(i), p, ("",)) for i, p in enumerate(paths)]
    images = embed_images(model, records, preprocessing, device, precision=precision, progress=False)
    prompts = [prompt.format(name.replace("_", " ")) for name in classes]
    texts = embed_texts(model, prompts, preprocessing, device, precision=precision, progress=False)
    predicted = (images @ texts.T).argmax(dim=1)  # (n_images,)
    return 100.0 * float((predicted == torch.tensor(labels)).float().mean())


def compare_variants(request: EvalRequest) -> dict[str, dict[str, float]]:
    """label -> metrics, for the base model ("zero-shot") and each adapter at each scale."""
    device = torch.device("cuda" if request.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if request.device == "auto" else request.device))
    precision = resolve_precision(request.precision, device)
    records, _ = read_split(request.data, request.split)
    records, bad = scan_images(records, request.data.max_image_pixels, desc=f"checking {request.split} images")
    classify = read_labelled_folder(request.classify_folder) if request.classify_folder else None

    results: dict[str, dict[str, float]] = {}
    embeddings_by_label = {}

    def score(label: str, model: ContrastiveModel, preprocessing: Preprocessing) -> None:
        embeddings = embed_split(model, records, preprocessing, device, request.batch_size, precision=precision)
        metrics = score_embeddings(embeddings)
        if classify is not None:
            metrics["zeroshot_classification_accuracy"] = zero_shot_accuracy(
                model, preprocessing, *classify, device, request.prompt, precision)
        results[label] = metrics
        embeddings_by_label[label] = embeddings

    model, preprocessing = load_model(request.model)
    model.to(device)
    score("zero-shot", model, preprocessing)
    for adapter in request.adapters:
        model, preprocessing = load_model(request.model)
        load_adapter(model, adapter)
        model.to(device)
        for scale in request.scales:
            set_adapter_scale(model, scale)
            label = adapter.name if request.scales == [1.0] else f"{adapter.name} x{scale:g}"
            score(label, model, preprocessing)
    if request.out_dir is not None:
        _write(request, results, records, embeddings_by_label, bad)
    return results


def _write(request: EvalRequest, results, records, embeddings_by_label, bad) -> None:
    from cliptune.report import ReportInputs, write_report
    from cliptune.reporting import similarity_examples

    out = request.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    last_label = list(results)[-1]
    write_report(out, ReportInputs(
        title=f"cliptune eval: {request.model.name} on {request.data.path} ({request.split})",
        config={"model": request.model.name, "adapters": [str(a) for a in request.adapters],
                "scales": request.scales, "data": request.data.path, "split": request.split},
        parameter_counts={}, timing={}, results=results, history=[],
        examples=similarity_examples(records, embeddings_by_label[last_label]),
        skipped_inputs=bad,
        notes=[f"{len(records)} images scored; similarity examples from `{last_label}`."],
    ))
