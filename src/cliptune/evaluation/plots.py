"""The run report's figures, drawn with matplotlib: training curves (`plot_loss`), retrieval recall
(`plot_recall`) and example retrievals (`plot_similarity`). Each writes one PNG, or returns why it was
skipped when its data are absent (report.py then says so in the report).
"""

from __future__ import annotations

import importlib.util
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from cliptune.evaluation.metrics import RECALL_KEYS
from cliptune.extras import missing, require

DPI = 120
MAX_EXAMPLES = 8  # rows in the similarity grid; more make the PNG unreadably tall
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


def missing_matplotlib() -> str | None:
    """Why no figure can be drawn (matplotlib, of the `report` extra, is not installed); None when it can."""
    if importlib.util.find_spec("matplotlib") is None:
        return str(missing("matplotlib", "report", "the report's figures"))
    return None


def pyplot():
    """pyplot, imported when a figure is drawn: the report's tables need no matplotlib (an extra)."""
    matplotlib = require("matplotlib", "report", "the run report's figures")
    # Headless: reports are written on servers and in CI, where an interactive backend would fail.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def plot_loss(history: list[dict], path: Path) -> str | None:
    """Train/val loss vs step with the learning rate on a twin axis; returns why it was skipped."""
    plt = pyplot()
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


def plot_recall(history: list[dict], results: dict[str, dict[str, float]], path: Path) -> str | None:
    """Validation R@K vs step when logged during training, else a bar chart of final recalls."""
    plt = pyplot()
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


def plot_similarity(examples: list[ExampleRow], path: Path) -> str | None:
    """One row per example: the image, then its top captions as score bars (green = true)."""
    plt = pyplot()
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

