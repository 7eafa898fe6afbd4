"""Turning a finished run (or an evaluation) into `report.md` / `report.html`.

`report.py` draws and writes; this module gathers what to show from a run's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from cliptune.data import ImageCaptions
from cliptune.evaluate import SplitEmbeddings, top_captions
from cliptune.report import CaptionScore, ExampleRow, ReportInputs, write_report


def read_history(metrics_path: Path) -> list[dict]:
    if not metrics_path.is_file():
        return []
    return [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]


def similarity_examples(records: list[ImageCaptions], embeddings: SplitEmbeddings, count: int = 6,
                        k: int = 4) -> list[ExampleRow]:
    """The first `count` images of the split, each with its k best captions (true ones marked)."""
    rows = []
    index = embeddings.text_image_index.tolist()
    for image_index in range(min(count, len(records))):
        top = [CaptionScore(embeddings.texts[t], score, index[t] == image_index)
               for t, score in top_captions(embeddings, image_index, k)]
        rows.append(ExampleRow(records[image_index].image_path, top, list(records[image_index].captions)))
    return rows


def write_run_report(trainer, result, final_embeddings: SplitEmbeddings | None) -> Path:
    """report.md/.html for a training run: config, counts, speed, zero-shot vs fine-tuned, curves, examples."""
    config = trainer.config
    notes = [f"Loss: {trainer.loss_fn.kind}; accumulation: {config.train.accumulation}; "
             f"precision: {trainer.precision}; device: {trainer.device}."]
    notes += trainer.annotation_problems.summary()
    if trainer.train_captions is not None and trainer.train_captions.truncated:
        notes.append(f"{trainer.train_captions.truncated} training captions were longer than the model's "
                     f"{trainer.preprocessing.max_text_length} tokens and were truncated.")
    if result.skipped_steps:
        notes.append(f"{result.skipped_steps} steps had a non-finite loss and were skipped.")
    notes.append(f"Metrics on the `{config.data.val_split}` split ({len(trainer.val_records)} images). "
                 "The validation loss depends on the batch size; compare it only within one config.")
    inputs = ReportInputs(
        title=f"cliptune run: {config.model.name}",
        config=config.to_dict(),
        parameter_counts={"trainable": result.parameters.trainable, "total": result.parameters.total,
                          "trainable_percent": result.parameters.percent},
        timing={"train_seconds": round(result.train_seconds, 1), "pairs_per_second": round(result.pairs_per_second, 2),
                "optimizer_steps": result.steps, "device": str(trainer.device)},
        results=result.results,
        history=read_history(trainer.metrics_path),
        examples=similarity_examples(trainer.val_records, final_embeddings) if final_embeddings is not None else [],
        skipped_inputs=result.bad_images,
        notes=notes,
    )
    return write_report(trainer.output_dir, inputs)
