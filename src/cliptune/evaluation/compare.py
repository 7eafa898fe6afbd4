"""`cliptune eval`: score a base model, its adapters and adapter scales side by side.

Images are checked once; each variant embeds the split once and is scored with the standard
protocol. Each adapter's column is labelled with its run's name (or `NAME=PATH`), and a scale s
puts every trained weight at base + s * (fine-tuned - base) (`lora.set_adapter_scale`), so x0 is the
zero-shot model and x1 the fine-tuned one. An optional labelled image folder measures forgetting as
zero-shot classification accuracy with "a photo of a {}" prompts, before and after, in the same table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cliptune.config import ConfigError, DataConfig, ModelConfig, RunConfig
from cliptune.data.batches import SKIPPED_SHOWN, describe_skipped, scan_images, skip_reason, skipped_lines
from cliptune.data.images import IMAGE_SUFFIXES
from cliptune.data.preprocessing import Preprocessing
from cliptune.data.readers import read_split
from cliptune.evaluation.embedding import embed_images, embed_split, embed_texts, score_embeddings
from cliptune.models.contrastive import ContrastiveModel, load_model
from cliptune.models.lora import load_adapter, set_adapter_scale
from cliptune.runtime import resolve_device, resolve_precision

BASELINE_LABEL = "zero-shot"


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to compare, and the column label its results go under."""

    label: str
    path: Path


def default_label(path: Path) -> str:
    """The run's name: a training run saves `<run>/adapter`, so every adapter folder is called
    "adapter" and only its parent tells runs apart."""
    path = Path(path)
    folder = path if path.name else path.resolve()
    if folder.name == "adapter":
        folder = folder.resolve().parent
    return folder.name


def parse_adapter_spec(text: str) -> AdapterSpec:
    """`PATH` (labelled with the run's name) or `NAME=PATH`. A path that exists as written wins, so
    a folder whose name holds "=" still works without a label."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists():
        return AdapterSpec(default_label(Path(text)), Path(text))
    if not name.strip() or not path:
        raise ConfigError(f"--adapter {text!r}: expected PATH or NAME=PATH")
    return AdapterSpec(name.strip(), Path(path))


def check_adapter_labels(adapters: list[AdapterSpec]) -> None:
    """Columns are keyed by label: two adapters with one label would overwrite each other's results."""
    seen: dict[str, Path] = {}
    for spec in adapters:
        if spec.label == BASELINE_LABEL:
            raise ConfigError(f"--adapter {spec.path}: the label {BASELINE_LABEL!r} is the base model's column; "
                              f"name this one with --adapter NAME={spec.path}")
        if spec.label in seen:
            raise ConfigError(f"--adapter: two adapters are labelled {spec.label!r} ({seen[spec.label]} and "
                              f"{spec.path}); name them with --adapter NAME=PATH")
        seen[spec.label] = spec.path


@dataclass
class EvalRequest:
    model: ModelConfig
    data: DataConfig
    split: str = "val"
    adapters: list[AdapterSpec] = field(default_factory=list)
    scales: list[float] = field(default_factory=lambda: [1.0])
    classify_folder: Path | None = None
    prompt: str = "a photo of a {}"
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    out_dir: Path | None = None

    def __post_init__(self) -> None:
        check_adapter_labels(self.adapters)


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
    images = embed_images(model, paths, preprocessing, device, precision=precision, progress=False)
    prompts = [prompt.format(name.replace("_", " ")) for name in classes]
    texts = embed_texts(model, prompts, preprocessing, device, precision=precision, progress=False)
    predicted = (images @ texts.T).argmax(dim=1)  # (n_images,)
    return 100.0 * float((predicted == torch.tensor(labels)).float().mean())


def compare_variants(request: EvalRequest) -> dict[str, dict[str, float]]:
    """label -> metrics, for the base model ("zero-shot") and each adapter at each scale."""
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    missing = [spec for spec in request.adapters if not spec.path.is_dir()]
    if missing:  # before the zero-shot pass, which can take long
        raise ConfigError(f"--adapter {missing[0].path}: folder does not exist (label {missing[0].label!r})")
    records, _ = read_split(request.data, request.split)
    records, bad = scan_images(records, request.data.max_image_pixels, desc=f"checking {request.split} images")
    checked = len(records) + len(bad)
    if not records:
        first = f" (the first {SKIPPED_SHOWN})" if len(bad) > SKIPPED_SHOWN else ""
        raise ValueError("\n".join([f"{request.data.path}: all {checked} {request.split} images are unreadable, "
                                    f"nothing to score{first}:", *skipped_lines(bad)]))
    if bad:
        print(describe_skipped(bad, checked, f"{request.split} images"))
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
    score(BASELINE_LABEL, model, preprocessing)
    for adapter in request.adapters:
        model, preprocessing = load_model(request.model)
        load_adapter(model, adapter.path)
        model.to(device)
        for scale in request.scales:
            set_adapter_scale(model, scale)
            label = adapter.label if request.scales == [1.0] else f"{adapter.label} x{scale:g}"
            score(label, model, preprocessing)
    if request.out_dir is not None:
        _write(request, results, records, embeddings_by_label, bad)
    return results


def evaluate(config: RunConfig, adapters: Sequence[str | Path] = (), split: str | None = None,
             scales: Sequence[float] = (1.0,), out_dir: str | Path | None = None,
             classify_folder: str | Path | None = None) -> dict[str, dict[str, float]]:
    """`cliptune eval` from Python: label -> metrics for `config.model` ("zero-shot") and each adapter
    (a folder, labelled with its run's name, or "NAME=PATH") at each scale, on `split` (default
    data.val_split) of `config.data`, batched, placed and cast as `config.train` says. `out_dir` also
    gets metrics.json and the report."""
    if not isinstance(config, RunConfig):
        raise ConfigError(f"evaluate: expected a RunConfig (cliptune.load_config(path, overrides)), "
                          f"got {type(config).__name__}")
    if not config.data.path:
        raise ConfigError("evaluate: data.path is empty: give the annotations to score")
    return compare_variants(EvalRequest(
        model=config.model, data=config.data, split=split or config.data.val_split,
        adapters=[parse_adapter_spec(str(adapter)) for adapter in adapters], scales=list(scales),
        classify_folder=Path(classify_folder) if classify_folder else None,
        batch_size=config.train.eval_batch_size, device=config.train.device, precision=config.train.precision,
        out_dir=Path(out_dir) if out_dir is not None else None))


def _write(request: EvalRequest, results, records, embeddings_by_label, bad) -> None:
    from cliptune.evaluation.report import ReportInputs, similarity_examples, write_report

    out = request.out_dir
    out.mkdir(parents=True, exist_ok=True)
    captions = sum(len(record.captions) for record in records)
    summary = {
        "results": results,
        "adapters": {spec.label: str(spec.path) for spec in request.adapters},
        "images_scored": len(records),
        "captions_scored": captions,
        "skipped": [{"file": path, "reason": skip_reason(path, why)} for path, why in bad],
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    last_label = list(results)[-1]
    write_report(out, ReportInputs(
        title=f"cliptune eval: {request.model.name} on {request.data.path} ({request.split})",
        config={"model": request.model.name, "adapters": summary["adapters"],
                "scales": request.scales, "data": request.data.path, "split": request.split},
        parameter_counts={}, timing={}, results=results, history=[],
        examples=similarity_examples(records, embeddings_by_label[last_label]),
        skipped_inputs=bad,
        notes=[f"{len(records)} images and {captions} captions scored"
               + (f"; {len(bad)} unreadable images skipped (listed below)" if bad else "")
               + f"; similarity examples from `{last_label}`."],
    ))
