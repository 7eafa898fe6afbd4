"""The trials table: one row per trial of the study, best first, as trials.csv and trials.json.

Rows are read from the Optuna study (each trial's swept values are its parameters, what it measured
its user attributes), so every machine sharing a study writes the whole table.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cliptune.evaluation.metrics import RECALL_KEYS
from cliptune.sweep.trial import CLASSIFICATION_KEYS

# What each row shows after the swept values, in this order (missing values are left empty).
COST_COLUMNS = ("trainable_parameters", "total_parameters", "train_seconds", "pairs_per_second", "peak_memory_gb")
METRIC_COLUMNS = (*RECALL_KEYS, "rsum", "zero_shot_rsum")
STATES = {"COMPLETE": "complete", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting", "PRUNED": "pruned"}


@dataclass
class TrialRecord:
    number: int
    state: str                      # complete, failed, interrupted (then queued again), running, waiting
    params: dict[str, Any]          # the swept values, as the space names them
    settings: dict[str, Any]        # the config keys they set
    measured: dict[str, float]      # COST_COLUMNS, the val metrics, zero_shot_rsum, forgetting ...
    objective: float | None = None
    run_dir: str | None = None
    worker: str | None = None       # host:pid that ran it
    error: str | None = None
    retry_of: int | None = None     # an interrupted trial this one reruns
    zero_shot_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.state == "complete" and self.objective is not None and math.isfinite(self.objective)


def reruns(trials: list[Any]) -> dict[int, tuple[int, str]]:
    """Interrupted trials: number -> (the trial queued to rerun it, why it stopped). The rerun carries the
    mark, because a failed trial can no longer be changed in Optuna's storage."""
    return {t.user_attrs["retry_of"]: (t.number, t.user_attrs.get("retry_reason", "interrupted"))
            for t in trials if "retry_of" in t.user_attrs}


def record_from_trial(trial: Any, rerun: dict[int, tuple[int, str]] | None = None) -> TrialRecord:
    """A TrialRecord from an Optuna FrozenTrial (duck-typed: number, state, params, value, user_attrs);
    `rerun` is `reruns(all trials)`."""
    attrs = trial.user_attrs
    state = STATES.get(trial.state.name, trial.state.name.lower())
    error = attrs.get("error")
    if state == "failed" and trial.number in (rerun or {}):
        retry, why = rerun[trial.number]
        state, error = "interrupted", f"{why}; rerun as trial {retry}"
    measured: dict[str, float] = {key: attrs[key] for key in COST_COLUMNS if key in attrs}
    measured.update(attrs.get("metrics") or {})
    zero_shot = attrs.get("zero_shot_metrics") or {}
    if "rsum" in zero_shot:
        measured["zero_shot_rsum"] = zero_shot["rsum"]
    measured.update(attrs.get("classification") or {})
    worker = attrs.get("worker")
    return TrialRecord(
        number=trial.number, state=state,
        params=dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {})),
        settings=attrs.get("settings", {}), measured=measured,
        objective=trial.value if state == "complete" else None, run_dir=attrs.get("run_dir"),
        worker=f"{worker['host']}:{worker['pid']}" if isinstance(worker, dict) else None,
        error=error, retry_of=attrs.get("retry_of"),
        zero_shot_metrics=zero_shot)


def sort_records(records: list[TrialRecord], maximize: bool) -> list[TrialRecord]:
    """Complete trials best first (ties by trial number), then the others by number."""
    done = sorted((r for r in records if r.complete),
                  key=lambda r: (-r.objective if maximize else r.objective, r.number))
    return done + sorted((r for r in records if not r.complete), key=lambda r: r.number)


def columns(records: list[TrialRecord], dimensions: list[str], objective: str) -> list[str]:
    """trial, state, the swept values, the objective, costs, recalls, RSUM, zero-shot RSUM, then any
    classification columns and the rest."""
    present = {key for r in records for key in r.measured}
    measured = [objective, *COST_COLUMNS, *METRIC_COLUMNS, "val_loss", *CLASSIFICATION_KEYS]
    measured = [key for key in dict.fromkeys(measured) if key in present or key == objective]
    return ["trial", "state", *dimensions, *measured, "run_dir", "error"]


def row(record: TrialRecord, header: list[str]) -> dict[str, Any]:
    cells = {"trial": record.number, "state": record.state, "run_dir": record.run_dir, "error": record.error}
    cells.update(record.params)
    cells.update(record.measured)
    return {name: cells.get(name) for name in header}


def write_tables(out_dir: Path, records: list[TrialRecord], dimensions: list[str], objective: str,
                 direction: str, about: dict[str, Any]) -> tuple[Path, Path]:
    """trials.csv (the table) and trials.json (the same rows in full, with `about`: study, storage,
    sampler, space), best first. Written whole and renamed into place, so a reader never sees half."""
    records = sort_records(records, maximize=direction == "maximize")
    header = columns(records, dimensions, objective)
    csv_path, json_path = Path(out_dir) / "trials.csv", Path(out_dir) / "trials.json"
    partial = csv_path.with_suffix(".csv.tmp")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else _csv_cell(v) for k, v in row(record, header).items()})
    os.replace(partial, csv_path)
    document = {**about, "objective": objective, "direction": direction, "columns": header,
                "trials": [asdict(record) for record in records]}
    partial = json_path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
    os.replace(partial, json_path)
    return csv_path, json_path


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float):
        return round(value, 6)  # 311.2, not the sum's 311.20000000000005 (trials.json keeps every digit)
    return value
