"""Shipping a fine-tuned model: one merged transformers folder, ONNX encoders, optional int8, a model card.

Layout of an export folder:

    OUT/                      merged model: `CLIPModel.from_pretrained(OUT)` (or SiglipModel / AutoModel)
      config.json, model.safetensors, tokenizer files, preprocessor_config.json, README.md
      onnx/                   only with `onnx=True`; read by `cliptune.deploy.embedders.OnnxEmbedder` without torch
        image_encoder.onnx    pixel_values float32 (B, 3, S, S) -> L2-normalised embeddings (B, D)
        text_encoder.onnx     input_ids, attention_mask int64 (B, L) -> L2-normalised embeddings (B, D)
        image_encoder.int8.onnx, text_encoder.int8.onnx   only with `quantize=True`
        tokenizer files, preprocessing.json

The LoRA update is merged into the weights (`merge_and_unload`), so the merged model has the base
model's architecture and cost: nothing of peft is needed to run it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cliptune.config import UsageError
from cliptune.data.images import SQUASH
from cliptune.data.preprocessing import Preprocessing
from cliptune.deploy.embedders import IMAGE_ONNX, ONNX_DIR, PREPROCESSING_FILE, TEXT_ONNX
from cliptune.extras import require
from cliptune.models.contrastive import ContrastiveModel
from cliptune.models.lora import load_merged_model

log = logging.getLogger(__name__)

# Opset 17 has LayerNormalization as one op; every onnxruntime from 1.14 runs it.
ONNX_OPSET = 17


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, int] = field(default_factory=dict)  # path relative to out_dir -> bytes

    def size_mb(self, prefix: str = "") -> float:
        return sum(size for name, size in self.files.items() if name.startswith(prefix)) / 1e6


def save_merged(model: ContrastiveModel, preprocessing: Preprocessing, out_dir: Path) -> None:
    """config.json + model.safetensors + tokenizer + image processor, as a hub model folder holds them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.base.save_pretrained(str(out_dir))  # safetensors is transformers' default format
    preprocessing.tokenizer.save_pretrained(str(out_dir))
    processor = _image_processor(model.family, preprocessing)
    if processor is not None:
        processor.save_pretrained(str(out_dir))


def _image_processor(family: str, preprocessing: Preprocessing):
    import transformers

    p = preprocessing
    size, resize = p.image_size, p.resize_size or p.image_size
    # The base model's own settings, so AutoImageProcessor on the export makes the pixels cliptune
    # trained and evaluated with. The PIL classes: the default ones need torchvision, and both save
    # the same preprocessor_config.json ("CLIPImageProcessor" / "SiglipImageProcessor").
    common = {"image_mean": list(p.image_mean), "image_std": list(p.image_std), "resample": p.resample,
              "rescale_factor": p.rescale_factor, "do_center_crop": resize != size or p.resize_mode != SQUASH,
              "crop_size": {"height": size, "width": size}}
    # A composed dual encoder resizes as CLIP does (shorter side, centre crop), with its own size and mean/std.
    if family in ("clip", "siglip", "dual"):
        kind = transformers.SiglipImageProcessorPil if family == "siglip" else transformers.CLIPImageProcessorPil
        sized = {"height": resize, "width": resize} if p.resize_mode == SQUASH else {"shortest_edge": resize}
        return kind(size=sized, **common)
    return None  # not a family load_model returns


class ImageEncoder(nn.Module):
    """pixel_values (B, 3, S, S) -> L2-normalised (B, D): what ONNX exports for the image side."""

    def __init__(self, model: ContrastiveModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model.encode_images(pixel_values), dim=-1)


class TextEncoder(nn.Module):
    """input_ids, attention_mask (B, L) -> L2-normalised (B, D)."""

    def __init__(self, model: ContrastiveModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model.encode_texts(input_ids, attention_mask), dim=-1)


def export_onnx(model: ContrastiveModel, preprocessing: Preprocessing, out_dir: Path) -> dict[str, Path]:
    """Write image_encoder.onnx, text_encoder.onnx, the tokenizer and preprocessing.json to `out_dir`.

    Uses the TorchScript exporter (`dynamo=False`): the dynamo exporter needs `onnxscript`, which
    cliptune does not depend on, and the traced graphs of these encoders have no data-dependent control flow.
    """
    require("onnx", "export")  # torch.onnx.export writes through it
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    size = preprocessing.image_size
    pixels = torch.randn(2, 3, size, size)
    tokens = preprocessing.tokenize(["a photo", "two dogs running on the beach"])
    paths = {"image": out_dir / IMAGE_ONNX, "text": out_dir / TEXT_ONNX}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at every shape comparison and at CLIP's argmax pooling (aten::index): these
        # graphs have no data-dependent control flow and non-negative indices, and the ONNX-vs-torch
        # equality test is the real check. A user exporting a model need not read them.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(ImageEncoder(model), (pixels,), str(paths["image"]), dynamo=False,
                          input_names=["pixel_values"], output_names=["embeddings"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "embeddings": {0: "batch"}},
                          opset_version=ONNX_OPSET)
        torch.onnx.export(TextEncoder(model), (tokens["input_ids"], tokens["attention_mask"]), str(paths["text"]),
                          dynamo=False, input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "embeddings": {0: "batch"}},
                          opset_version=ONNX_OPSET)
    preprocessing.tokenizer.save_pretrained(str(out_dir))
    tokenizer = preprocessing.tokenizer
    with torch.no_grad():
        dim = int(ImageEncoder(model)(pixels[:1]).shape[-1])
    settings = {
        "family": model.family,
        "embedding_dim": dim,
        "image_size": size,
        "mean": list(preprocessing.image_mean),
        "std": list(preprocessing.image_std),
        # The image processor's resize rule and rescale: OnnxEmbedder feeds the processor's exact pixels.
        "resize": preprocessing.resize_rule.at(size).to_dict(),
        "rescale_factor": preprocessing.rescale_factor,
        "max_text_length": preprocessing.max_text_length,
        "pad_to_max_length": preprocessing.pad_to_max_length,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    }
    (out_dir / PREPROCESSING_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return paths


def quantize_onnx(onnx_dir: Path) -> dict[str, Path]:
    """int8 dynamic quantisation of both encoders' MatMul/Gemm weights (activations stay float).
    Convolutions are left in float: ConvInteger has no fast kernel in onnxruntime's CPU provider."""
    require("onnx", "export")
    require("onnxruntime.quantization", "export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    paths = {}
    for side, name in (("image", IMAGE_ONNX), ("text", TEXT_ONNX)):
        target = onnx_dir / name.replace(".onnx", ".int8.onnx")
        quantize_dynamic(str(onnx_dir / name), str(target), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
        paths[side] = target
    return paths


def find_run_metrics(adapter: Path | None) -> Path | None:
    """A training run writes adapter/ and metrics.json side by side."""
    if adapter is None:
        return None
    candidate = Path(adapter).parent / "metrics.json"
    return candidate if candidate.is_file() else None


FAMILY_DESCRIPTIONS = {"clip": "A CLIP dual encoder", "siglip": "A SigLIP dual encoder",
                       "dual": "A dual encoder composed from a pretrained vision backbone and text encoder"}
METRIC_COLUMNS = ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5", "rsum")
# What the hub accepts as `base_model`: `org/name` or a legacy bare name; never a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_model_id(base: str) -> str | None:
    """`base` when it names a hub model; None for a local folder (even one named like `org/name`) or a
    `random:` model, which the hub's `base_model` field cannot point at."""
    if Path(base).expanduser().exists() or not HUB_ID.fullmatch(base):
        return None
    return base


def write_model_card(out_dir: Path, base: str, family: str, adapter: Path | None, metrics: dict | None,
                     onnx: bool, quantized: bool) -> Path:
    """README.md with the hub's YAML front matter: what the model is, what it was tuned on and how,
    its retrieval metrics, and how to load it. The run's data and recipe come from the config.yaml a
    training run writes beside adapter/."""
    lora = {}
    if adapter is not None and (Path(adapter) / "adapter_config.json").is_file():
        raw = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
        lora = {k: raw.get(k) for k in ("r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora")}
        targets = raw.get("target_modules") or []
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets}) if isinstance(targets, list) else [targets]
        lora["target_modules"] = f"{len(targets) if isinstance(targets, list) else '?'} layers ({', '.join(leaves)})"
        lora["modules_to_save"] = raw.get("modules_to_save")
    model_class = {"clip": "CLIPModel", "siglip": "SiglipModel"}.get(family, "AutoModel")
    tags = ["cliptune", family, "image-text-retrieval"] + (["lora", "peft-merged"] if adapter else []) \
        + (["onnx"] if onnx else [])
    hub_id = hub_model_id(str(base))
    lines = ["---", "library_name: transformers"] + ([f"base_model: {hub_id}"] if hub_id else []) + ["tags:"]
    lines += [f"- {t}" for t in tags]
    base_line = (f"[`{hub_id}`](https://huggingface.co/{hub_id})" if hub_id else
                 f"`{Path(base).expanduser().resolve()}` (a local folder)" if Path(base).expanduser().exists() else
                 f"`{base}`")
    lines += ["pipeline_tag: zero-shot-image-classification", "---", "",
              f"# {out_dir.name}", "",
              f"{FAMILY_DESCRIPTIONS.get(family, 'A dual encoder')}, "
              f"{'fine-tuned with cliptune (LoRA, merged into the weights)' if adapter else 'exported by cliptune (base weights, no adapter)'}.",
              "", f"- Base model: {base_line}"]
    if adapter is not None:
        lines.append(f"- Adapter: `{Path(adapter).name}`")
    lines += _data_section(adapter, metrics)
    if lora:
        lines += ["", "## LoRA configuration", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in lora.items()]
    variants = _metric_variants(metrics)
    if variants:
        names = [n for n in METRIC_COLUMNS if any(n in v for v in variants.values())]
        lines += ["", "## Retrieval metrics", "", "| variant | " + " | ".join(names) + " |",
                  "| --- " * (len(names) + 1) + "|"]
        for variant, values in variants.items():
            lines.append(f"| {variant} | " + " | ".join(f"{values.get(n, float('nan')):.2f}" for n in names) + " |")
    lines += ["", "## Use with transformers", "", "```python", "import torch",
              f"from transformers import AutoTokenizer, {model_class}", "",
              f"model = {model_class}.from_pretrained(\"PATH\").eval()",
              "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")",
              "with torch.no_grad():",
              "    text = model.get_text_features(**tokenizer([\"a dog on a beach\"], padding=True, return_tensors=\"pt\"))",
              "```"]
    if family == "dual":
        lines += ["", "The composed model type is registered by cliptune: `import cliptune.models.dual_encoder` first."]
    if onnx:
        lines += ["", "## Use with onnxruntime (no torch)", "", "```python",
                  "from cliptune.deploy.embedders import OnnxEmbedder", "",
                  f"embedder = OnnxEmbedder(\"PATH/{ONNX_DIR}\"{', quantized=True' if quantized else ''})",
                  "text = embedder.embed_texts([\"a dog on a beach\"])     # (1, D), L2-normalised",
                  "images = embedder.embed_images([\"photo.jpg\"])          # (1, D)",
                  "```", "",
                  f"Or directly: `onnxruntime.InferenceSession(\"PATH/{ONNX_DIR}/{IMAGE_ONNX}\")` takes "
                  "`pixel_values` (B, 3, S, S) float32 normalised with the mean/std in "
                  f"`{ONNX_DIR}/{PREPROCESSING_FILE}`, and `{TEXT_ONNX}` takes `input_ids`, `attention_mask` (int64); "
                  "both return L2-normalised embeddings."]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _data_section(adapter: Path | None, metrics: dict | None) -> list[str]:
    """## Training data: the run's annotations, splits and recipe (config.yaml beside adapter/)."""
    lines = ["", "## Training data", ""]
    if adapter is None:
        return lines + ["None: the base model's weights, exported unchanged."]
    config_path = Path(adapter).parent / "config.yaml"
    if not config_path.is_file():
        return lines + [f"Not recorded: no config.yaml beside the adapter (`{Path(adapter).parent.name}/`)."]
    import yaml

    run = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    data, train = run.get("data") or {}, run.get("train") or {}
    rows = [("annotations", f"`{data.get('path')}` ({data.get('format', 'auto')})"),
            ("images", f"`{data['image_root']}`" if data.get("image_root") else "beside the annotations"),
            ("splits", f"trained on `{data.get('train_split')}`, scored on `{data.get('val_split')}`"),
            ("captions", {"sample": "one of each image's captions drawn per epoch",
                          "all": "every caption of every image, each epoch"}.get(data.get("captions"), "?"))]
    if data.get("max_images"):
        rows.append(("images per split", f"first {data['max_images']}"))
    if isinstance(metrics, dict) and "images_scored" in metrics:
        rows.append(("scored", f"{metrics['images_scored']} images, {metrics.get('captions_scored', '?')} captions"))
    micro, steps = train.get("micro_batch_size"), train.get("grad_accum_steps")
    rows += [("epochs", train.get("epochs")),
             ("batch", f"{micro} x {steps} pairs ({train.get('accumulation')} accumulation)"),
             ("optimizer", f"AdamW, lr {train.get('lr')}, {train.get('schedule')} schedule, "
                           f"warmup {train.get('warmup_ratio')}, weight decay {train.get('weight_decay')}"),
             ("seed", train.get("seed"))]
    return lines + ["| | |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows]


def _metric_variants(metrics: dict | None) -> dict[str, dict]:
    """{variant: metrics} from a training run's metrics.json ({"zero-shot": {...}, "fine-tuned": {...}}),
    `cliptune eval --out`'s ({"results": {...}, "images_scored": ...}) or one flat metrics dict."""
    if not isinstance(metrics, dict):
        return {}
    if isinstance(metrics.get("results"), dict):
        metrics = metrics["results"]
    if any(name in metrics for name in METRIC_COLUMNS):
        return {"model": metrics}
    return {name: values for name, values in metrics.items()
            if isinstance(values, dict) and any(n in values for n in METRIC_COLUMNS)}


def export_model(base: str, out_dir: Path, adapter: Path | None = None, onnx: bool = False, quantize: bool = False,
                 metrics_path: Path | None = None) -> ExportResult:
    """Merge `adapter` into `base` and write the export folder described in this module's docstring."""
    out_dir = Path(out_dir)
    # Every argument is checked before the model loads: a typo should not cost a minute of loading.
    if quantize and not onnx:
        raise UsageError("export: int8 quantisation applies to the ONNX encoders; add onnx (--onnx)")
    if not str(base).strip():
        raise UsageError("export: model.name is empty: give the base model (hub id or folder)")
    if adapter is not None and not Path(adapter).is_dir():
        raise UsageError(f"export: adapter folder {adapter} does not exist")
    if metrics_path is not None and not Path(metrics_path).is_file():
        raise UsageError(f"export: metrics file {metrics_path} does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"export: {out_dir} is a file, not a folder")
    if onnx:
        require("onnx", "export")
    if quantize:
        require("onnxruntime.quantization", "export")
    model, preprocessing = load_merged_model(base, adapter)
    save_merged(model, preprocessing, out_dir)
    if onnx:
        export_onnx(model, preprocessing, out_dir / ONNX_DIR)
        if quantize:
            quantize_onnx(out_dir / ONNX_DIR)
    metrics_path = metrics_path or find_run_metrics(adapter)
    metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8")) if metrics_path else None
    write_model_card(out_dir, base, model.family, adapter, metrics, onnx, quantize)
    files = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()}
    return ExportResult(out_dir, files)


@dataclass(frozen=True)
class QuantizationReport:
    fp32: dict[str, float]                 # retrieval_metrics of the fp32 encoders
    int8: dict[str, float]
    fp32_seconds: float                    # encoding the split's images + captions
    int8_seconds: float

    @property
    def speedup(self) -> float:
        return self.fp32_seconds / self.int8_seconds

    def delta(self, name: str) -> float:
        return self.int8[name] - self.fp32[name]

    def describe(self) -> str:
        parts = [f"{name} {self.fp32[name]:.2f} -> {self.int8[name]:.2f} ({self.delta(name):+.2f})"
                 for name in ("image_to_text_R@1", "text_to_image_R@1")]
        return (f"int8 vs fp32: {'; '.join(parts)}; encode {self.fp32_seconds:.2f} s -> {self.int8_seconds:.2f} s "
                f"(x{self.speedup:.2f})")

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def measure_quantization(onnx_dir: Path, records: list, batch_size: int = 32) -> QuantizationReport:
    """R@1 and encode time of the fp32 and int8 ONNX encoders on `records` (ImageCaptions)."""
    from cliptune.data.readers import flatten_captions
    from cliptune.deploy.embedders import OnnxEmbedder
    from cliptune.evaluation.metrics import retrieval_metrics

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"train.eval_batch_size: {batch_size!r} must be an integer >= 1")
    if not records:
        raise UsageError("measure_quantization: no images to measure on")
    texts, text_image_index = flatten_captions(records)
    paths = [r.image_path for r in records]
    results, seconds = {}, {}
    for quantized in (False, True):
        embedder = OnnxEmbedder(onnx_dir, quantized=quantized, batch_size=batch_size)
        embedder.embed_texts(texts[:2])  # warm-up: session allocation is not encode time
        start = time.perf_counter()
        image_emb = embedder.embed_images(paths)
        text_emb = embedder.embed_texts(texts)
        seconds[quantized] = time.perf_counter() - start
        results[quantized] = retrieval_metrics(torch.from_numpy(image_emb), torch.from_numpy(text_emb),
                                               torch.tensor(text_image_index, dtype=torch.long))
    return QuantizationReport(results[False], results[True], seconds[False], seconds[True])
