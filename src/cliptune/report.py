"""The run report: one Markdown + HTML page with the results table, training curves and examples.

`write_report` turns what a run measured (`ReportInputs`) into `report.md`, `report.html` and three
PNG figures beside them. A figure whose data are absent is skipped with a line saying so, so that a
zero-shot evaluation without training still gets a report. `format_metrics_table` and
`format_results_for_terminal` give the side-by-side results table on its own.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path

import matplotlib

# Headless: reports are written on servers and in CI, where an interactive backend would fail.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow matplotlib.use)
import yaml  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from cliptune.metrics import METRIC_KEYS, RECALL_KEYS  # noqa: E402

DPI = 120
MAX_EXAMPLES = 8  # rows in the similarity grid; more make the PNG unreadably tall
MAX_SKIPPED_LISTED = 50
TRUE_COLOR = "#2e7d32"
FALSE_COLOR = "#c62828"


@dataclass
class CaptionScore:
    """One retrieved caption for an example image."""

    text: str
    score: float
    is_true: bool  # the caption belongs to this image


@dataclass
class ExampleRow:
    """One image of the similarity grid with its best-scoring captions."""

    image_path: Path
    top_captions: list[CaptionScore]  # best first
    true_captions: list[str]


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


# --- results table ------------------------------------------------------------------------------
def _decimals(key: str) -> int:
    """Recalls and ranks read well at 1 decimal; cosines differ in the 2nd-3rd decimal."""
    if "cosine" in key:
        return 3
    if "R@" in key or key == "rsum" or key.endswith("_rank"):
        return 1
    return 3


def _format_value(key: str, value: float | None) -> str:
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


def _table_cells(
    results: dict[str, dict[str, float]], keys: Sequence[str] | None
) -> tuple[list[str], list[list[str]]]:
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
            row.append(_format_value(key, value))
            if position > 0:
                row.append(_format_delta(key, value, baseline))
        rows.append(row)
    return header, rows


def format_metrics_table(results: dict[str, dict[str, float]], keys: Sequence[str] | None = None) -> str:
    """Markdown table: one row per metric, one column per label, a signed delta column after each
    non-first label (relative to the first). `keys` picks and orders the rows; by default every
    metric present, `METRIC_KEYS` first."""
    return _markdown_rows(*_table_cells(results, keys), align_numbers=True)


def format_results_for_terminal(
    results: dict[str, dict[str, float]], keys: Sequence[str] | None = None
) -> str:
    """The same table as `format_metrics_table`, as aligned plain text for a terminal."""
    header, rows = _table_cells(results, keys)
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _lower_is_better(key: str) -> bool:
    return key.endswith("_rank") or "loss" in key or key == "mean_cosine_unmatched"


def _html_table(header: list[str], rows: list[list[str]], numeric: bool) -> str:
    """HTML table; with `numeric`, right-align values and colour deltas green when they improve."""
    esc = html.escape

    def css_class(column: int, text: str, key: str) -> str:
        if not numeric or column == 0:
            return ""
        classes = ["num"]
        if header[column].startswith("Δ") and text[:1] in "+-" and text.strip("+-0.") != "":
            improved = (text[0] == "+") != _lower_is_better(key)
            classes.append("up" if improved else "down")
        return f' class="{" ".join(classes)}"'

    head = "".join(f"<th{css_class(i, '', '')}>{esc(text)}</th>" for i, text in enumerate(header))
    body = "\n".join(
        "<tr>"
        + "".join(f"<td{css_class(i, text, row[0])}>{esc(text)}</td>" for i, text in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


# --- figures --------------------------------------------------------------------------------------
def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = sorted(
        (record["step"], record[key])
        for record in history
        if key in record and "step" in record and record[key] is not None
    )
    return [step for step, _ in points], [value for _, value in points]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: per-step train loss is too noisy to read a trend from."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plot_loss(history: list[dict], path: Path) -> str | None:
    """Train/val loss vs step with the learning rate on a twin axis; returns why it was skipped."""
    train_steps, train_loss = _series(history, "train_loss")
    val_steps, val_loss = _series(history, "val_loss")
    lr_steps, lr = _series(history, "lr")
    if not train_loss and not val_loss:
        return "no train_loss or val_loss in the training history"

    fig, ax = plt.subplots(figsize=(9, 4.8))
    if train_loss:
        window = max(1, len(train_loss) // 25)
        if window > 1:
            ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(
                train_steps,
                _smooth(train_loss, window),
                color="tab:blue",
                label=f"train loss ({window}-point average)",
            )
        else:
            ax.plot(train_steps, train_loss, color="tab:blue", label="train loss")
    if val_loss:
        ax.plot(val_steps, val_loss, color="tab:orange", marker="o", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        lr_ax = ax.twinx()
        lr_ax.plot(lr_steps, lr, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        lr_handles, lr_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title("Training and validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return None


def _plot_recall(history: list[dict], results: dict[str, dict[str, float]], path: Path) -> str | None:
    """Validation R@K vs step when logged during training, else a bar chart of final recalls."""
    curves = {key: _series(history, f"val_{key}") for key in RECALL_KEYS}
    curves = {key: xy for key, xy in curves.items() if xy[1]}
    if curves:
        fig, ax = plt.subplots(figsize=(9, 4.8))
        colors = {1: "tab:blue", 5: "tab:orange", 10: "tab:green"}
        for key, (steps, values) in curves.items():
            k = int(key.rsplit("@", 1)[1])
            style = "-" if key.startswith("image_to_text") else "--"
            ax.plot(steps, values, style, marker="o", markersize=3, color=colors.get(k), label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("recall (%)")
        ax.set_title("Validation retrieval recall (solid: image→text, dashed: text→image)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small", ncol=2)
    else:
        labels = [label for label, metrics in results.items() if any(k in metrics for k in RECALL_KEYS)]
        if not labels:
            return "no recall values in the history or the results"
        fig, ax = plt.subplots(figsize=(10, 4.8))
        width = 0.8 / len(labels)
        for position, label in enumerate(labels):
            xs = [i + (position - (len(labels) - 1) / 2) * width for i in range(len(RECALL_KEYS))]
            values = [results[label].get(key, float("nan")) for key in RECALL_KEYS]
            bars = ax.bar(xs, values, width=width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.set_xticks(range(len(RECALL_KEYS)))
        ax.set_xticklabels(
            [key.replace("_to_", "→").replace("image", "img").replace("text", "txt") for key in RECALL_KEYS]
        )
        ax.set_ylabel("recall (%)")
        ax.set_ylim(0, 109)  # room for the value labels above 100
        ax.set_title("Retrieval recall by model")
        ax.grid(axis="y", alpha=0.3)
        # Below the axes: inside it, the legend would hide the bars of the last group.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(labels), 5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return None


def _load_thumbnail(path: Path, size: int = 256) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            # Phone photos store rotation in EXIF; without this they show sideways.
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            return image
    except (OSError, ValueError):
        return None


def _plot_similarity(examples: list[ExampleRow], path: Path) -> str | None:
    """One row per example: the image, then its top captions as score bars (green = true)."""
    if not examples:
        return "no example images were given"
    examples = examples[:MAX_EXAMPLES]
    wrap = 60
    # Row height follows the wrapped caption lines, so long captions neither overlap nor leave gaps.
    row_heights = []
    for example in examples:
        lines = sum(len(textwrap.wrap(c.text, wrap)) or 1 for c in example.top_captions)
        row_heights.append(max(2.2, 0.16 * lines + 0.2 * len(example.top_captions) + 0.6))
    # One x range for every row, so bar lengths compare across images too.
    all_scores = [c.score for example in examples for c in example.top_captions] or [0.0]
    low, high = min(0.0, min(all_scores)), max(all_scores)
    xlim = (low, high + 0.15 * (high - low or 1.0))  # room for the score text after each bar

    fig, axes = plt.subplots(
        len(examples),
        2,
        figsize=(13, sum(row_heights) + 0.5),
        squeeze=False,
        layout="constrained",  # unlike tight_layout, keeps the suptitle clear of the first row
        gridspec_kw={"width_ratios": [1.1, 3], "height_ratios": row_heights},
    )
    for (image_ax, bar_ax), example in zip(axes, examples, strict=True):
        thumbnail = _load_thumbnail(example.image_path)
        if thumbnail is None:
            image_ax.text(0.5, 0.5, "image unreadable", ha="center", va="center", color=FALSE_COLOR)
        else:
            image_ax.imshow(thumbnail)
        image_ax.set_axis_off()
        image_ax.set_title(textwrap.shorten(Path(example.image_path).name, 40), fontsize=8)

        captions = example.top_captions
        ys = list(range(len(captions)))[::-1]  # best caption on top
        scores = [c.score for c in captions]
        colors = [TRUE_COLOR if c.is_true else FALSE_COLOR for c in captions]
        bar_ax.barh(ys, scores, color=colors, alpha=0.8, height=0.65)
        bar_ax.set_yticks(ys)
        bar_ax.set_yticklabels(
            [("✓ " if c.is_true else "✗ ") + "\n".join(textwrap.wrap(c.text, wrap)) for c in captions],
            fontsize=8,
        )
        for tick, color in zip(bar_ax.get_yticklabels(), colors, strict=True):
            tick.set_color(color)
        for y, score in zip(ys, scores, strict=True):
            bar_ax.text(score, y, f" {score:.3f}", va="center", fontsize=8)
        bar_ax.set_xlim(*xlim)
        bar_ax.set_ylim(-0.6, len(captions) - 0.4)
        bar_ax.set_xlabel("cosine similarity", fontsize=8)
        bar_ax.tick_params(axis="x", labelsize=7)
        bar_ax.grid(axis="x", alpha=0.3)
        if not any(c.is_true for c in captions) and example.true_captions:
            missed = textwrap.shorten(example.true_captions[0], 90)
            bar_ax.set_title(
                f"no true caption in the top {len(captions)}; one is: “{missed}”",
                fontsize=8,
                color=FALSE_COLOR,
                loc="left",
            )
        else:
            bar_ax.set_title(f"top {len(captions)} captions", fontsize=8, loc="left")
    fig.suptitle("Best-scoring captions per image (green ✓ = a true caption, red ✗ = another image's)")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return None


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
    if not counts:
        return None
    trainable, total = counts.get("trainable"), counts.get("total")
    percent = counts.get("trainable_percent")
    if percent is None and trainable is not None and total:
        percent = 100.0 * trainable / total
    parts = []
    if trainable is not None:
        parts.append(f"{trainable:,} trainable")
    if total is not None:
        parts.append(f"of {total:,} parameters")
    if percent is not None:
        parts.append(f"({percent:.4f} %)")
    return " ".join(parts) or None


@dataclass
class _Section:
    """One report section, kept as data so that Markdown and HTML say the same thing."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    numeric_table: bool = False  # right-aligned numbers with deltas (the results table)
    image: str | None = None
    code: str | None = None
    bullets: list[str] = field(default_factory=list)


def _build_sections(out_dir: Path, inputs: ReportInputs) -> list[_Section]:
    sections: list[_Section] = []

    results = _Section("Results")
    if inputs.results:
        results.table = _table_cells(inputs.results, None)
        results.numeric_table = True
        labels = list(inputs.results)
        results.paragraphs.append(
            "Recalls in percent under the standard protocol (image→text: an image is a hit if any of "
            "its captions is in its top K). Ranks are 1-based, lower is better."
            + (f" Δ columns are relative to “{labels[0]}”." if len(labels) > 1 else "")
        )
    else:
        results.paragraphs.append("No evaluation results were recorded.")
    sections.append(results)

    figures = [
        ("Training curves", "loss.png", _plot_loss, (inputs.history,)),
        ("Retrieval recall", "recall.png", _plot_recall, (inputs.history, inputs.results)),
        ("Example retrievals", "similarity.png", _plot_similarity, (inputs.examples,)),
    ]
    for heading, filename, plot, args in figures:
        section = _Section(heading)
        skipped = plot(*args, out_dir / filename)
        if skipped is None:
            section.image = filename
        else:
            (out_dir / filename).unlink(missing_ok=True)  # a stale figure from an earlier run would lie
            section.paragraphs.append(f"Plot skipped: {skipped}.")
        sections.append(section)

    model = _Section("Model and run")
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
        skipped = _Section(f"Skipped inputs ({len(unique)})")
        skipped.paragraphs.append("These data items could not be read and were left out:")
        skipped.table = (
            ["path", "reason"],  # reasons that start with their path lose it: it is in the first column
            [[path, reason.removeprefix(f"{path}: ")] for path, reason in list(unique.items())[:MAX_SKIPPED_LISTED]],
        )
        if len(unique) > MAX_SKIPPED_LISTED:
            skipped.paragraphs.append(f"… and {len(unique) - MAX_SKIPPED_LISTED} more.")
        sections.append(skipped)

    if inputs.notes:
        sections.append(_Section("Notes", bullets=list(inputs.notes)))

    config = _Section("Configuration")
    config.code = yaml.safe_dump(_to_plain(inputs.config), sort_keys=False, allow_unicode=True).rstrip()
    sections.append(config)
    return sections


def _markdown(title: str, generated: str, sections: list[_Section]) -> str:
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


def _html(title: str, generated: str, sections: list[_Section]) -> str:
    esc = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">Generated {esc(generated)} by cliptune.</p>',
    ]
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
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sections = _build_sections(out_dir, inputs)
    markdown_path = out_dir / "report.md"
    markdown_path.write_text(_markdown(inputs.title, generated, sections), encoding="utf-8")
    (out_dir / "report.html").write_text(_html(inputs.title, generated, sections), encoding="utf-8")
    return markdown_path
