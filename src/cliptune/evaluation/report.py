"""The report: one Markdown + HTML page with the results table, training curves and examples.

`write_report` turns what a run or an evaluation measured (`ReportInputs`) into `report.md`,
`report.html` and three PNG figures beside them (plots.py). A figure whose data are absent is skipped
with a line saying so, so that a zero-shot evaluation without training still gets a report.
`write_run_report` does it for a finished training run (`RunSummary`). `format_metrics_table` and
`format_results_for_terminal` give the side-by-side results table on its own; `write_page` writes
any list of `Section`s as such a page (the sweep report).
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cliptune.data.readers import ImageCaptions
from cliptune.evaluation import plots
from cliptune.evaluation.embedding import SplitEmbeddings, top_captions
from cliptune.evaluation.metrics import METRIC_KEYS
from cliptune.evaluation.plots import CaptionScore, ExampleRow

if TYPE_CHECKING:
    from cliptune.config import RunConfig
    from cliptune.models.lora import ParameterCount

log = logging.getLogger(__name__)

MAX_SKIPPED_LISTED = 50


@dataclass
class ReportInputs:
    """Everything a report shows; each part may be empty."""

    title: str
    config: dict  # run config as plain data, rendered as YAML
    parameter_counts: dict  # {"trainable": int, "total": int, "trainable_percent": float}
    timing: dict  # e.g. {"train_seconds": float, "pairs_per_second": float, "device": "cpu"}
    results: dict[str, dict[str, float]]  # label -> metrics; the FIRST label is the delta baseline
    history: list[dict]  # metrics.jsonl records, each with "step" and some of the logged values
    examples: list[ExampleRow]
    skipped_inputs: list[tuple[str, str]]  # (path, reason) of unreadable data items
    notes: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    """What a finished training run shows in its report (the training recipe fills it in)."""

    config: RunConfig  # the report goes to config.train.output_dir
    parameters: ParameterCount
    steps: int
    train_seconds: float
    pairs_per_second: float
    skipped_steps: int
    results: dict[str, dict[str, float]]  # "zero-shot", "fine-tuned" -> metrics
    bad_images: list[tuple[str, str]]  # (path or shard:key, why) left out of training or validation
    loss: str  # the loss's kind: "clip" or "siglip"
    precision: str
    device: str
    data_notes: list[str]  # annotation rows dropped, captions cut, ...
    history: list[dict]  # metrics.jsonl records
    val_records: list[ImageCaptions]
    val_embeddings: SplitEmbeddings | None  # the fine-tuned model's, for the example retrievals


# --- results table ------------------------------------------------------------------------------
def _decimals(key: str) -> int:
    """Recalls and ranks read well at 1 decimal; cosines differ in the 2nd-3rd decimal."""
    if "cosine" in key:
        return 3
    if "R@" in key or key == "rsum" or key.endswith("_rank"):
        return 1
    return 3


def format_value(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.{_decimals(key)}f}"


def _format_delta(key: str, value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline):
        return "—"
    decimals = _decimals(key)
    delta = round(value - baseline, decimals)
    if delta == 0:
        delta = 0.0  # avoid printing "-0.0"
    return f"{delta:+.{decimals}f}"


def _default_keys(results: dict[str, dict[str, float]]) -> list[str]:
    """Known metrics in their stable order, then any extra keys in first-seen order."""
    present = {key for metrics in results.values() for key in metrics}
    keys = [key for key in METRIC_KEYS if key in present]
    for metrics in results.values():
        keys += [key for key in metrics if key not in keys]
    return keys


def _table_cells(results: dict[str, dict[str, float]],
                 keys: Sequence[str] | None) -> tuple[list[str], list[list[str]]]:
    """Header and body cells shared by the Markdown, HTML and terminal renderings."""
    keys = list(keys) if keys is not None else _default_keys(results)
    labels = list(results)
    header = ["metric"]
    for position, label in enumerate(labels):
        header.append(label)
        if position > 0:
            header.append(f"Δ vs {labels[0]}")
    rows = []
    for key in keys:
        baseline = results[labels[0]].get(key) if labels else None
        row = [key]
        for position, label in enumerate(labels):
            value = results[label].get(key)
            row.append(format_value(key, value))
            if position > 0:
                row.append(_format_delta(key, value, baseline))
        rows.append(row)
    return header, rows


def format_metrics_table(results: dict[str, dict[str, float]], keys: Sequence[str] | None = None) -> str:
    """Markdown table: one row per metric, one column per label, a signed delta column after each
    non-first label (relative to the first). `keys` picks and orders the rows; by default every
    metric present, `METRIC_KEYS` first."""
    return _markdown_rows(*_table_cells(results, keys), align_numbers=True)


def format_results_for_terminal(results: dict[str, dict[str, float]], keys: Sequence[str] | None = None) -> str:
    """The same table as `format_metrics_table`, as aligned plain text for a terminal."""
    header, rows = _table_cells(results, keys)
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def lower_is_better(key: str) -> bool:
    return key.endswith("_rank") or "loss" in key or key == "mean_cosine_unmatched"


def _html_table(header: list[str], rows: list[list[str]], numeric: bool) -> str:
    """HTML table; with `numeric`, right-align values and colour deltas green when they improve."""
    esc = html.escape

    def css_class(column: int, text: str, key: str) -> str:
        if not numeric or column == 0:
            return ""
        classes = ["num"]
        if header[column].startswith("Δ") and text[:1] in "+-" and text.strip("+-0.") != "":
            improved = (text[0] == "+") != lower_is_better(key)
            classes.append("up" if improved else "down")
        return f' class="{" ".join(classes)}"'

    head = "".join(f"<th{css_class(i, '', '')}>{esc(text)}</th>" for i, text in enumerate(header))
    body = "\n".join("<tr>" + "".join(f"<td{css_class(i, text, row[0])}>{esc(text)}</td>" for i, text in enumerate(row))
                     + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


# --- report pages ---------------------------------------------------------------------------------
def _to_plain(value: object) -> object:
    """Make a config YAML-safe: paths, tuples, enums and dataclasses become plain data."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Enum):
        return _to_plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _format_timing_value(key: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("_seconds"):
        return f"{value:,.1f} s ({_dt.timedelta(seconds=round(value))})"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.2f}"


def _parameter_line(counts: dict) -> str | None:
    trainable, total, percent = counts.get("trainable"), counts.get("total"), counts.get("trainable_percent")
    if percent is None and trainable is not None and total:
        percent = 100.0 * trainable / total
    parts = [f"{trainable:,} trainable" if trainable is not None else None,
             f"of {total:,} parameters" if total is not None else None,
             f"({percent:.4f} %)" if percent is not None else None]
    return " ".join(part for part in parts if part) or None


@dataclass
class Section:
    """One report section, kept as data so that Markdown and HTML say the same thing."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    numeric_table: bool = False  # right-aligned numbers with deltas (the results table)
    image: str | None = None
    code: str | None = None
    bullets: list[str] = field(default_factory=list)


def _build_sections(out_dir: Path, inputs: ReportInputs) -> list[Section]:
    sections: list[Section] = []

    results = Section("Results")
    if inputs.results:
        results.table = _table_cells(inputs.results, None)
        results.numeric_table = True
        labels = list(inputs.results)
        results.paragraphs.append("Recalls in percent under the standard protocol (image→text: an image is a hit "
                                  "if any of its captions is in its top K). Ranks are 1-based, lower is better."
                                  + (f" Δ columns are relative to “{labels[0]}”." if len(labels) > 1 else ""))
    else:
        results.paragraphs.append("No evaluation results were recorded.")
    sections.append(results)

    figures = [("Training curves", "loss.png", plots.plot_loss, (inputs.history,)),
               ("Retrieval recall", "recall.png", plots.plot_recall, (inputs.history, inputs.results)),
               ("Example retrievals", "similarity.png", plots.plot_similarity, (inputs.examples,))]
    unavailable = plots.missing_matplotlib()  # without it the report is still written, its figures skipped
    if unavailable:
        log.warning("%s; the report is written without them", unavailable)
    for heading, filename, plot, args in figures:
        section = Section(heading)
        skipped = unavailable or plot(*args, out_dir / filename)
        if skipped is None:
            section.image = filename
        else:
            (out_dir / filename).unlink(missing_ok=True)  # a stale figure from an earlier run would lie
            section.paragraphs.append(f"Plot skipped: {skipped}.")
        sections.append(section)

    model = Section("Model and run")
    parameter_line = _parameter_line(inputs.parameter_counts)
    if parameter_line:
        model.bullets.append(f"Parameters: {parameter_line}")
    model.bullets += [f"{key}: {_format_timing_value(key, value)}" for key, value in inputs.timing.items()]
    if not model.bullets:
        model.paragraphs.append("No parameter counts or timing were recorded.")
    sections.append(model)

    if inputs.skipped_inputs:
        # One row per file: a file in both train and val (or refused again while training) is one skip.
        unique: dict[str, str] = {}
        for path, reason in inputs.skipped_inputs:
            unique.setdefault(path, reason)
        skipped = Section(f"Skipped inputs ({len(unique)})")
        skipped.paragraphs.append("These data items could not be read and were left out:")
        # Reasons that start with their path lose it: it is in the first column.
        skipped.table = (["path", "reason"], [[path, reason.removeprefix(f"{path}: ")]
                                              for path, reason in list(unique.items())[:MAX_SKIPPED_LISTED]])
        if len(unique) > MAX_SKIPPED_LISTED:
            skipped.paragraphs.append(f"… and {len(unique) - MAX_SKIPPED_LISTED} more.")
        sections.append(skipped)

    if inputs.notes:
        sections.append(Section("Notes", bullets=list(inputs.notes)))

    config = Section("Configuration")
    config.code = yaml.safe_dump(_to_plain(inputs.config), sort_keys=False, allow_unicode=True).rstrip()
    sections.append(config)
    return sections


def _markdown(title: str, generated: str, sections: list[Section]) -> str:
    out = [f"# {title}", "", f"_Generated {generated} by cliptune._", ""]
    for section in sections:
        out += [f"## {section.heading}", ""]
        if section.image:
            out += [f"![{section.heading}]({section.image})", ""]
        for paragraph in section.paragraphs:
            out += [paragraph, ""]
        if section.table:
            out += [_markdown_rows(*section.table, align_numbers=section.numeric_table), ""]
        out += [f"- {bullet}" for bullet in section.bullets]
        if section.bullets:
            out.append("")
        if section.code is not None:
            out += ["```yaml", section.code, "```", ""]
    return "\n".join(out)


def _markdown_rows(header: list[str], rows: list[list[str]], align_numbers: bool) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    align = "|:---|" + ("---:|" if align_numbers else ":---|") * (len(header) - 1)
    return "\n".join([line(header), align, *(line(row) for row in rows)])


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: .3em .7em; text-align: left; }
th { background: #f5f5f5; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.up { color: #2e7d32; } td.down { color: #c62828; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; }
.meta { color: #777; font-style: italic; }
"""


def _html(title: str, generated: str, sections: list[Section]) -> str:
    esc = html.escape
    out = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>",
           f'<p class="meta">Generated {esc(generated)} by cliptune.</p>']
    for section in sections:
        out.append(f"<h2>{esc(section.heading)}</h2>")
        if section.image:
            out.append(f'<p><img src="{esc(section.image)}" alt="{esc(section.heading)}"></p>')
        out += [f"<p>{esc(paragraph)}</p>" for paragraph in section.paragraphs]
        if section.table:
            out.append(_html_table(*section.table, numeric=section.numeric_table))
        if section.bullets:
            out.append("<ul>" + "".join(f"<li>{esc(b)}</li>" for b in section.bullets) + "</ul>")
        if section.code is not None:
            out.append(f"<pre><code>{esc(section.code)}</code></pre>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_report(out_dir: Path, inputs: ReportInputs) -> Path:
    """Write report.md, report.html, loss.png, recall.png and similarity.png into `out_dir`.

    Figures without data are skipped (and any stale copy removed) with a line in the report.
    Returns the path of report.md.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_page(out_dir, inputs.title, _build_sections(out_dir, inputs))


def write_page(out_dir: Path, title: str, sections: list[Section]) -> Path:
    """report.md and report.html in `out_dir` from `sections` (their images already beside them), in the
    report's one style; also how `cliptune sweep` writes its report. Returns the path of report.md."""
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    markdown_path = Path(out_dir) / "report.md"
    markdown_path.write_text(_markdown(title, generated, sections), encoding="utf-8")
    (Path(out_dir) / "report.html").write_text(_html(title, generated, sections), encoding="utf-8")
    return markdown_path


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


def write_run_report(run: RunSummary) -> Path:
    """report.md/.html for a training run: config, counts, speed, zero-shot vs fine-tuned, curves, examples."""
    config = run.config
    notes = [f"Loss: {run.loss}; accumulation: {config.train.accumulation}; precision: {run.precision}; "
             f"device: {run.device}.", *run.data_notes]
    if run.skipped_steps:
        notes.append(f"{run.skipped_steps} steps had a non-finite loss and were skipped.")
    notes.append(f"Metrics on the `{config.data.val_split}` split ({len(run.val_records)} images). "
                 "The validation loss depends on the batch size; compare it only within one config.")
    inputs = ReportInputs(
        title=f"cliptune run: {config.model.name}", config=config.to_dict(),
        parameter_counts={"trainable": run.parameters.trainable, "total": run.parameters.total,
                          "trainable_percent": run.parameters.percent},
        timing={"train_seconds": round(run.train_seconds, 1), "pairs_per_second": round(run.pairs_per_second, 2),
                "optimizer_steps": run.steps, "device": run.device},
        results=run.results, history=run.history,
        examples=similarity_examples(run.val_records, run.val_embeddings) if run.val_embeddings is not None else [],
        skipped_inputs=run.bad_images, notes=notes)
    return write_report(Path(config.train.output_dir), inputs)
