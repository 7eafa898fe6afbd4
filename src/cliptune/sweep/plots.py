"""The sweep report's figures, in the run report's style (cliptune.evaluation.plots): the objective
against what it cost, with the Pareto front marked (`plot_pareto`), and the objective against each
swept setting (`plot_effects`). Each writes one PNG, or returns why it was skipped."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cliptune.evaluation.plots import DPI, pyplot
from cliptune.evaluation.report import format_value
from cliptune.sweep.pareto import pareto_front
from cliptune.sweep.space import SearchSpace
from cliptune.sweep.table import TrialRecord

FRONT_COLOR = "tab:blue"
OTHER_COLOR = "#9e9e9e"
ZERO_SHOT_COLOR = "tab:red"
COSTS = (("trainable_parameters", "trainable parameters"), ("train_seconds", "train time (s)"))


def _better(direction: str) -> str:
    return "higher is better" if direction == "maximize" else "lower is better"


def plot_pareto(records: list[TrialRecord], objective: str, direction: str, path: Path) -> str | None:
    """The objective against trainable parameters and against train time, one panel each: a trial on
    the front (blue, joined) has no other trial that is at least as good for no more cost."""
    done = [r for r in records if r.complete]
    if len(done) < 2:
        return f"{len(done)} complete trial(s): a trade-off needs two"
    plt = pyplot()
    from matplotlib import ticker  # with pyplot: matplotlib is the `report` extra

    fig, axes = plt.subplots(1, len(COSTS), figsize=(12, 4.8), squeeze=False)
    zero_shot = next((r.zero_shot_metrics[objective] for r in done if objective in r.zero_shot_metrics), None)
    varying = [name for name in dict.fromkeys(k for r in done for k in r.params)
               if len({repr(r.params.get(name)) for r in done}) > 1]
    settings = {r.number: "(" + ", ".join(str(r.params.get(name)) for name in varying) + ")" for r in done}
    for ax, (cost, label) in zip(axes[0], COSTS, strict=True):
        points = [(r.measured[cost], r.objective, r.number) for r in done if cost in r.measured]
        front = pareto_front([p[0] for p in points], [p[1] for p in points], maximize=direction == "maximize")
        on = sorted(p for p, f in zip(points, front, strict=True) if f)
        off = [p for p, f in zip(points, front, strict=True) if not f]
        if off:
            ax.scatter([p[0] for p in off], [p[1] for p in off], color=OTHER_COLOR, s=36, zorder=2,
                       label="dominated trial")
        ax.plot([p[0] for p in on], [p[1] for p in on], color=FRONT_COLOR, drawstyle="steps-post", linewidth=1.2,
                zorder=1)
        ax.scatter([p[0] for p in on], [p[1] for p in on], color=FRONT_COLOR, s=48, zorder=3, label="Pareto front")
        labels: dict[tuple[float, float], list[str]] = {}
        for (x, y, number), on_front in zip(points, front, strict=True):
            # Trials at one point share one label; a trial on the front also shows its settings.
            labels.setdefault((x, y), []).append(f"#{number}" + (f" {settings[number]}" if on_front else ""))
        middle = (min(xs := [p[0] for p in points]) + max(xs)) / 2
        for (x, y), names in labels.items():
            right = x > middle  # labels point inwards, so the last trial's does not run off the axes
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(-5 if right else 5, 4),
                        ha="right" if right else "left", fontsize=8)
        _zero_shot_line(ax, zero_shot, [p[1] for p in points])
        if cost == "trainable_parameters":
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")  # ranks and towers spread parameter counts over decades
            ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))  # 600k, 1.2M: no "1e6" corner label
        ax.margins(x=0.08, y=0.1)  # room for the labels of the outermost trials
        ax.set_xlabel(label)
        ax.set_ylabel(f"{objective} ({_better(direction)})")
        ax.set_title(f"{objective} against {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle("Each point is a trial (#number, as in the table); on the front also its "
                 f"({', '.join(varying)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return None


def _zero_shot_line(ax, zero_shot: float | None, scores: list[float]) -> None:
    """The zero-shot value as a dashed line when it lies near the trials; far below them (a model whose
    heads start untrained) a line would squash the trials' differences into one pixel row, so it is
    named in a corner instead."""
    if zero_shot is None:
        return
    low, high = min(scores), max(scores)
    near = max(high - low, 1e-9) * 2
    if low - near <= zero_shot <= high + near:
        ax.axhline(zero_shot, color=ZERO_SHOT_COLOR, linestyle="--", linewidth=1, label=f"zero-shot ({zero_shot:.1f})")
    else:
        where = "below" if zero_shot < low else "above"
        ax.text(0.01, 0.01 if where == "below" else 0.99, f"zero-shot: {zero_shot:.1f} ({where} this axis)",
                transform=ax.transAxes, fontsize=8, color=ZERO_SHOT_COLOR, va="bottom" if where == "below" else "top")


def plot_effects(records: list[TrialRecord], space: SearchSpace, objective: str, direction: str,
                 path: Path) -> str | None:
    """One panel per swept setting that took two or more values: each trial's objective at its value,
    and the mean of each value (a black bar) for settings picked from a list."""
    done = [r for r in records if r.complete]
    swept = [dim for dim in space.dimensions if len({repr(r.params.get(dim.name)) for r in done}) > 1]
    if not done or not swept:
        return "no setting took two values among the complete trials"
    plt = pyplot()
    columns = min(3, len(swept))
    rows = -(-len(swept) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.9 * rows), squeeze=False, sharey=True)
    for ax, dim in zip(axes.flat, swept):
        trials = [(r.params[dim.name], r.objective) for r in done if dim.name in r.params]
        if dim.kind == "range":
            ax.scatter([x for x, _ in trials], [y for _, y in trials], color=FRONT_COLOR, s=30)
            if dim.log:
                ax.set_xscale("log")
        else:
            options = [o for o in dim.options if any(x == o for x, _ in trials)]
            for position, option in enumerate(options):
                ys = [y for x, y in trials if x == option]
                # Spread equal values sideways a little, so that two trials never hide one another.
                offsets = [(i - (len(ys) - 1) / 2) * 0.06 for i in range(len(ys))]
                ax.scatter([position + o for o in offsets], ys, color=FRONT_COLOR, s=30, zorder=2)
                mean = sum(ys) / len(ys)
                ax.hlines(mean, position - 0.25, position + 0.25, color="black", linewidth=2, zorder=3)
                ax.annotate(format_value(objective, mean), (position + 0.25, mean), textcoords="offset points", xytext=(3, 0),
                            va="center", fontsize=8)
            ax.set_xticks(range(len(options)))
            ax.set_xticklabels(["\n".join(textwrap.wrap(str(o), 16)) for o in options], fontsize=8)
            ax.set_xlim(-0.6, len(options) - 0.4)
        ax.set_title(dim.name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{objective} ({_better(direction)})")
    for ax in list(axes.flat)[len(swept):]:
        ax.set_axis_off()
    fig.suptitle(f"{objective} by setting (dots: trials; black bar: mean of the trials with that value)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return None
