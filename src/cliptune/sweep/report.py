"""The sweep report: report.md + report.html in the sweep folder, in the run report's style
(`cliptune.evaluation.report.write_page`): the best trial, the objective against its cost with the
Pareto front (pareto.png), the trials table best first, the effect of each swept setting
(effects.png), the failed trials with their errors, the search space and the base config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from cliptune.evaluation import plots as run_plots
from cliptune.evaluation.report import Section, format_value, write_page
from cliptune.sweep import plots
from cliptune.sweep.pareto import pareto_front
from cliptune.sweep.space import SearchSpace
from cliptune.sweep.table import COST_COLUMNS, TrialRecord, columns, row, sort_records

log = logging.getLogger(__name__)


def describe_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in params.items())


def format_cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in ("trainable_parameters", "total_parameters"):
        return f"{int(value):,}"
    if name == "train_seconds":
        return f"{value:,.1f}"
    if name in ("pairs_per_second", "peak_memory_gb"):
        return f"{value:.2f}"
    if isinstance(value, float):
        return format_value(name.removeprefix("zero_shot_"), value)
    return str(value)


def write_sweep_report(out_dir: Path, records: list[TrialRecord], space: SearchSpace, objective: str,
                       direction: str, about: dict[str, Any], base_config: dict[str, Any]) -> Path:
    """report.md / report.html (and pareto.png, effects.png) in `out_dir`; returns report.md's path."""
    out_dir = Path(out_dir)
    records = sort_records(records, maximize=direction == "maximize")
    done = [r for r in records if r.complete]
    counts = {state: sum(r.state == state for r in records)
              for state in ("complete", "failed", "interrupted", "running", "waiting")}
    better = "higher" if direction == "maximize" else "lower"
    summary = Section("Summary")
    summary.paragraphs.append(
        f"{len(records)} trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        + f". Objective: {objective} on the val split ({better} is better); the test split is never read.")
    if done:
        best = done[0]
        zero_shot = best.zero_shot_metrics.get(objective)
        summary.paragraphs.append(
            f"Best: trial {best.number} ({describe_params(best.params)}): {objective} "
            f"{format_value(objective, best.objective)}"
            + (f", zero-shot {format_value(objective, zero_shot)}" if zero_shot is not None else "") + ".")
    summary.bullets = [f"{key}: {value}" for key, value in about.items() if key != "space"]
    sections = [summary]

    unavailable = run_plots.missing_matplotlib()
    if unavailable:
        log.warning("%s; the sweep report is written without its figures", unavailable)
    trade_off = Section(f"{objective} against its cost")
    fronts = []
    for cost, label in plots.COSTS:
        points = [r for r in done if cost in r.measured]
        flags = pareto_front([r.measured[cost] for r in points], [r.objective for r in points],
                             maximize=direction == "maximize")
        fronts.append(f"against {label.split(' (')[0]}: trials "
                      + ", ".join(str(r.number) for r, on in sorted(zip(points, flags, strict=True),
                                                                     key=lambda p: p[0].measured[cost]) if on))
    if done:
        trade_off.paragraphs.append("On the Pareto front (no other trial is as good for no more cost) "
                                    + "; ".join(fronts) + ".")
    _figure(trade_off, out_dir / "pareto.png", unavailable,
            lambda path: plots.plot_pareto(records, objective, direction, path))
    sections.append(trade_off)

    header = columns(records, space.names, objective)
    shown = [name for name in header if name not in ("run_dir", "error", "total_parameters")]
    table = Section("Trials, best first")
    table.table = (shown, [[format_cell(name, row(r, shown)[name]) for name in shown] for r in records])
    table.numeric_table = True
    table.paragraphs.append(f"Recalls in percent on the val split; zero_shot_rsum is the model before training; "
                            f"{', '.join(COST_COLUMNS[2:])} are the trial's training (peak memory: the process's "
                            "resident set on a CPU, the allocator's peak on a GPU). Each trial's run folder, "
                            "with its own report, is trials/NNNN.")
    sections.append(table)

    effects = Section("Effect of each swept setting")
    _figure(effects, out_dir / "effects.png", unavailable,
            lambda path: plots.plot_effects(records, space, objective, direction, path))
    sections.append(effects)

    failed = [r for r in records if r.state in ("failed", "interrupted")]
    if failed:
        sections.append(Section(f"Failed and interrupted trials ({len(failed)})", table=(
            ["trial", "state", "settings", "error"],
            [[str(r.number), r.state, describe_params(r.params), r.error or ""] for r in failed])))
    sections.append(Section("Search space", code=yaml.safe_dump(space.raw, sort_keys=False).rstrip()))
    sections.append(Section("Base configuration", code=yaml.safe_dump(base_config, sort_keys=False).rstrip()))
    return write_page(out_dir, f"cliptune sweep: {out_dir.name}", sections)


def _figure(section: Section, path: Path, unavailable: str | None, draw) -> None:
    skipped = unavailable or draw(path)
    if skipped is None:
        section.image = path.name
    else:
        path.unlink(missing_ok=True)  # a stale figure from an earlier report would lie
        section.paragraphs.append(f"Plot skipped: {skipped}.")
