"""write_report and the results tables, on small fake-but-plausible inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cliptune.evaluation.metrics import METRIC_KEYS
from cliptune.evaluation.report import (
    CaptionScore,
    ExampleRow,
    ReportInputs,
    format_metrics_table,
    format_results_for_terminal,
    write_report,
)

ZERO_SHOT = {
    "image_to_text_R@1": 78.9,
    "image_to_text_R@5": 94.9,
    "image_to_text_R@10": 98.2,
    "text_to_image_R@1": 58.8,
    "text_to_image_R@5": 83.6,
    "text_to_image_R@10": 90.0,
    "rsum": 504.4,
    "image_to_text_median_rank": 1.0,
    "image_to_text_mean_rank": 1.9,
    "text_to_image_median_rank": 1.0,
    "text_to_image_mean_rank": 6.2,
    "mean_cosine_matched": 0.305,
    "mean_cosine_unmatched": 0.121,
    "cosine_gap": 0.184,
}
FINE_TUNED = {
    **ZERO_SHOT,
    "image_to_text_R@1": 84.2,
    "text_to_image_R@1": 68.3,
    "rsum": 523.2,
    "text_to_image_mean_rank": 4.1,
    "mean_cosine_matched": 0.4121,
    "cosine_gap": 0.2911,
}


def make_images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, (color, size) in enumerate([("red", (64, 48)), ("green", (40, 80)), ("blue", (96, 96))]):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", size, color).save(path, "JPEG")
        paths.append(path)
    return paths


def make_inputs(tmp_path: Path, history: list[dict] | None = None) -> ReportInputs:
    images = make_images(tmp_path)
    examples = [
        ExampleRow(
            image_path=path,
            top_captions=[
                CaptionScore(f"a {color} square on a plain background, photographed in daylight", 0.41, True),
                CaptionScore(
                    "a dog running across a very long field of grass near a river bank", 0.33, False
                ),
                CaptionScore("two people sitting on a bench", 0.29, False),
            ],
            true_captions=[f"a {color} square on a plain background, photographed in daylight"],
        )
        for path, color in zip(images, ["red", "green", "blue"], strict=True)
    ]
    examples.append(
        ExampleRow(
            image_path=tmp_path / "missing.jpg",  # unreadable: drawn as a placeholder, not a crash
            top_captions=[CaptionScore("a cat", 0.2, False)],
            true_captions=["a kitten asleep"],
        )
    )
    if history is None:
        history = [
            {
                "step": s,
                "train_loss": 2.0 / (1 + s / 10),
                "lr": 1e-4 * (1 - s / 100),
                "pairs_per_second": 30.0,
            }
            for s in range(1, 100)
        ]
        history += [{"step": s, "val_loss": 1.5 / (1 + s / 20)} for s in (25, 50, 75, 99)]
        history += [
            {"step": s, "val_image_to_text_R@1": 70 + s / 10, "val_text_to_image_R@1": 50 + s / 8}
            for s in (25, 50, 75, 99)
        ]
    return ReportInputs(
        title="Flickr30k ViT-B/32 LoRA",
        config={"model": {"name": "openai/clip-vit-base-patch32", "lora_r": 16}, "data": {"root": tmp_path}},
        parameter_counts={"trainable": 4_423_680, "total": 155_700_993, "trainable_percent": 2.8411},
        timing={"train_seconds": 2967.0, "pairs_per_second": 29.3, "device": "cpu"},
        results={"zero-shot": ZERO_SHOT, "fine-tuned": FINE_TUNED},
        history=history,
        examples=examples,
        skipped_inputs=[("images/broken.jpg", "cannot identify image file")],
        notes=["Validation on 1,014 images."],
    )


def assert_png(path: Path, min_side: int = 300) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert min(image.size) >= min_side and max(image.size) <= 6000


def test_write_report_full(tmp_path):
    report = write_report(tmp_path / "out", make_inputs(tmp_path))
    out = tmp_path / "out"
    assert report == out / "report.md"
    for name in ("loss.png", "recall.png", "similarity.png"):
        assert_png(out / name)
    md = report.read_text(encoding="utf-8")
    assert "# Flickr30k ViT-B/32 LoRA" in md
    assert "| metric | zero-shot | fine-tuned | Δ vs zero-shot |" in md
    assert "| image_to_text_R@1 | 78.9 | 84.2 | +5.3 |" in md
    assert "| text_to_image_mean_rank | 6.2 | 4.1 | -2.1 |" in md
    assert "| cosine_gap | 0.184 | 0.291 | +0.107 |" in md
    for key in METRIC_KEYS:
        assert f"| {key} |" in md
    for name in ("loss.png", "recall.png", "similarity.png"):
        assert f"({name})" in md
    assert "4,423,680 trainable of 155,700,993 parameters (2.8411 %)" in md
    assert "images/broken.jpg" in md and "cannot identify image file" in md
    assert "lora_r: 16" in md  # config rendered as YAML, Path values included
    html = (out / "report.html").read_text(encoding="utf-8")
    for name in ("loss.png", "recall.png", "similarity.png"):
        assert f'<img src="{name}"' in html
    assert "<table>" in html and "image_to_text_R@1" in html
    assert 'class="num up">+5.3<' in html  # recall went up: good
    assert 'class="num up">-2.1<' in html  # mean rank went down: also good


def test_report_without_history_or_examples(tmp_path):
    out = tmp_path / "out"
    # A stale figure from an earlier run must not survive into a report that doesn't show it.
    out.mkdir()
    (out / "loss.png").write_bytes(b"stale")
    inputs = make_inputs(tmp_path, history=[])
    inputs.examples = []
    inputs.skipped_inputs = []
    inputs.notes = []
    md = write_report(out, inputs).read_text(encoding="utf-8")
    assert not (out / "loss.png").exists()
    assert not (out / "similarity.png").exists()
    assert "Plot skipped: no train_loss or val_loss" in md
    assert "Plot skipped: no example images" in md
    # Without val recall curves the recall figure falls back to a bar chart of the results.
    assert_png(out / "recall.png")
    assert (out / "report.html").is_file()
    assert "Skipped inputs" not in md


def test_report_with_only_val_records(tmp_path):
    history = [{"step": s, "val_loss": 1.0 / s} for s in (10, 20, 30)]
    inputs = make_inputs(tmp_path, history=history)
    inputs.results = {"zero-shot": ZERO_SHOT}
    inputs.examples = []
    md = write_report(tmp_path / "out", inputs).read_text(encoding="utf-8")
    assert_png(tmp_path / "out" / "loss.png")
    assert "Δ" not in md  # a single label has nothing to compare with


def test_format_metrics_table_deltas():
    results = {
        "base": {"text_to_image_R@1": 50.0, "mean_cosine_matched": 0.3, "text_to_image_mean_rank": 4.0},
        "tuned": {"text_to_image_R@1": 61.25, "mean_cosine_matched": 0.2875, "text_to_image_mean_rank": 4.0},
        "half": {"text_to_image_R@1": 49.0, "extra_accuracy": 0.5},
    }
    table = format_metrics_table(results).splitlines()
    assert table[0] == "| metric | base | tuned | Δ vs base | half | Δ vs base |"
    assert table[1] == "|:---|---:|---:|---:|---:|---:|"
    assert table[2] == "| text_to_image_R@1 | 50.0 | 61.2 | +11.2 | 49.0 | -1.0 |"
    assert table[3] == "| text_to_image_mean_rank | 4.0 | 4.0 | +0.0 | — | — |"
    assert table[4] == "| mean_cosine_matched | 0.300 | 0.287 | -0.013 | — | — |"
    assert table[5] == "| extra_accuracy | — | — | — | 0.500 | — |"  # extras after the known metrics
    only = format_metrics_table(results, keys=["mean_cosine_matched"]).splitlines()
    assert len(only) == 3 and only[2].startswith("| mean_cosine_matched |")


def test_format_results_for_terminal_is_aligned():
    text = format_results_for_terminal({"zero-shot": ZERO_SHOT, "fine-tuned": FINE_TUNED})
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "zero-shot", "fine-tuned", "Δ", "vs", "zero-shot"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(METRIC_KEYS)
    r1 = next(line for line in lines if line.startswith("image_to_text_R@1 "))
    assert r1.split() == ["image_to_text_R@1", "78.9", "84.2", "+5.3"]
    # Right-aligned numbers: every value column ends at the same character position.
    assert len({len(line) for line in lines[2:]}) == 1


@pytest.mark.parametrize("delta, shown", [(1e-9, "+0.0"), (-1e-9, "+0.0"), (-0.06, "-0.1")])
def test_delta_rounding_never_shows_negative_zero(delta, shown):
    table = format_metrics_table({"a": {"rsum": 100.0}, "b": {"rsum": 100.0 + delta}})
    assert table.splitlines()[2].endswith(f"| {shown} |")


def test_without_matplotlib_the_report_is_written_and_its_figures_say_how_to_get_them(tmp_path, monkeypatch):
    """matplotlib comes with the `report` extra: a base install still trains and writes report.md/.html;
    each figure is skipped with the install command, and a stale PNG from an earlier run is removed."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss.png").write_bytes(b"stale")
    md = write_report(out, make_inputs(tmp_path)).read_text(encoding="utf-8")
    assert md.count("Plot skipped: the report's figures needs matplotlib, which is not installed: "
                    "pip install 'cliptune[report]'") == 3
    assert not any(out.glob("*.png"))
    assert "| image_to_text_R@1 | 78.9 | 84.2 | +5.3 |" in md and (out / "report.html").is_file()


def test_write_run_report_shows_what_the_run_summary_holds(tmp_path):
    import torch

    from cliptune.config import load_config
    from cliptune.data.readers import ImageCaptions
    from cliptune.evaluation.embedding import SplitEmbeddings
    from cliptune.evaluation.report import RunSummary, write_run_report
    from cliptune.models.lora import ParameterCount

    images = make_images(tmp_path)
    records = [ImageCaptions(str(i), path, (f"caption {i}", f"other {i}")) for i, path in enumerate(images)]
    texts = [c for r in records for c in r.captions]
    image_emb = torch.nn.functional.normalize(torch.eye(3, 4), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.eye(3, 4).repeat_interleave(2, 0) + 0.1, dim=-1)
    embeddings = SplitEmbeddings(image_emb, text_emb, torch.arange(3).repeat_interleave(2), texts)
    config = load_config(None, {"model.name": "tiny-model", "train.output_dir": str(tmp_path / "run"),
                                "train.accumulation": "plain"})
    summary = RunSummary(config=config, parameters=ParameterCount(1_000, 50_000), steps=12, train_seconds=90.25,
                         pairs_per_second=7.125, skipped_steps=2, results={"zero-shot": ZERO_SHOT, "fine-tuned": FINE_TUNED},
                         bad_images=[("images/x.jpg", "images/x.jpg: truncated")], loss="siglip", precision="bf16",
                         device="cuda:0", data_notes=["3 training captions were truncated."],
                         history=[{"step": s, "train_loss": 1.0 / s} for s in range(1, 13)], val_records=records,
                         val_embeddings=embeddings)
    md = write_run_report(summary).read_text(encoding="utf-8")
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "report.html").is_file()
    assert "# cliptune run: tiny-model" in md
    assert "Loss: siglip; accumulation: plain; precision: bf16; device: cuda:0." in md
    assert "- 3 training captions were truncated." in md
    assert "2 steps had a non-finite loss and were skipped." in md
    assert "Metrics on the `val` split (3 images)." in md
    assert "1,000 trainable of 50,000 parameters (2.0000 %)" in md
    assert "optimizer_steps: 12" in md and "pairs_per_second: 7.12" in md and "device: cuda:0" in md
    assert "| images/x.jpg | truncated |" in md
    assert "| image_to_text_R@1 | 78.9 | 84.2 | +5.3 |" in md
    for name in ("loss.png", "recall.png", "similarity.png"):
        assert_png(tmp_path / "run" / name)
