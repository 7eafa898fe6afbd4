"""`cliptune sweep`: an Optuna study whose trials are training runs, with budgets and resume.

Optuna picks each trial's settings (GridSampler over the space's lists, or TPE / random sampling)
and keeps every trial in its storage: a SQLite file in the sweep folder by default, or any database
URL (`postgresql://...`), which lets sweeps on several machines share one study. Trials run one at a
time in this process; what each measured is stored with it, and after each one trials.csv/json are
rewritten from the storage, so they always hold every machine's trials.

Resume is the storage's: the same command again loads the study, and finished trials (complete or
failed) are never rerun. A trial that a killed process left RUNNING is marked interrupted (failed)
and queued again with the same settings: at once when it ran on this machine and its process is
gone, and after the heartbeat's grace period when it ran elsewhere. Budgets: `trials` is the size
of the study (complete + failed), so the same command finishes the rest; `max_minutes` starts no
new trial once this command has run that long.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import Any, Literal

import psutil

from cliptune.config import RunConfig, UsageError
from cliptune.extras import require
from cliptune.sweep.report import describe_params, write_sweep_report
from cliptune.sweep.space import SearchSpace
from cliptune.sweep.table import TrialRecord, record_from_trial, reruns, write_tables
from cliptune.sweep.trial import (
    LabelledImages,
    TrialInterrupted,
    objective_direction,
    objective_names,
    run_trial,
    trial_config,
)

log = logging.getLogger(__name__)

Sampler = Literal["auto", "grid", "tpe", "random"]
HEARTBEAT_SECONDS = 60    # a running trial tells the storage it is alive this often...
GRACE_SECONDS = 600       # ...and one silent this long (a dead machine) is marked interrupted by another worker
STUDY_ATTRS = ("space", "objective", "direction")  # what a resumed sweep must share with the study's start


class TrialFailed(Exception):
    """A trial's error, already recorded with the trial; the sweep goes on."""


@dataclass
class SweepOptions:
    """What `cliptune sweep` was asked to do (the CLI builds it from flags; the library never sees them)."""

    base: RunConfig                 # the config every trial starts from (--config + --section.key flags)
    space: SearchSpace
    out_dir: Path
    objective: str = "rsum"
    sampler: Sampler = "auto"       # auto: grid when every dimension is a list, else tpe
    trials: int | None = None       # the size of the study; a grid stops at its size anyway
    max_minutes: float | None = None
    storage: str | None = None      # an Optuna RDB URL; None: sqlite:///OUT/study.db
    study_name: str | None = None   # None: the sweep folder's name
    classify_folder: Path | None = None
    progress: bool = True           # the trainer's progress bars
    verbose: bool = False           # Optuna's own log lines
    say: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        names = objective_names(self.classify_folder is not None)
        if self.objective not in names:
            import difflib

            close = difflib.get_close_matches(self.objective, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            extra = "" if self.classify_folder else " (and, with --classify-folder, zeroshot_classification_accuracy, forgetting)"
            raise UsageError(f"sweep --objective {self.objective!r}: not a metric{hint} "
                             f"(metrics: {', '.join(names)}{extra})")
        if self.sampler == "auto":
            self.sampler = "tpe" if self.space.ranges else "grid"
        if self.sampler == "grid":
            self.space.grid()  # refuses a range, naming it
        elif self.trials is None and self.max_minutes is None:
            raise UsageError(f"sweep --sampler {self.sampler}: give --trials N or --max-minutes M "
                             "(a sampler, unlike a grid, has no end of its own)")
        if self.trials is not None and self.trials < 1:
            raise UsageError(f"sweep --trials {self.trials}: must be >= 1")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UsageError(f"sweep --max-minutes {self.max_minutes}: must be > 0")
        data = self.base.data
        if not self.base.train.report:
            raise UsageError("sweep: train.report is false in the base config, but a trial is scored by the "
                             "end-of-run evaluation on the val split, which it turns off")
        if data.val_split == data.test_split:
            raise UsageError(f"sweep: data.val_split and data.test_split are both {data.val_split!r}: a sweep "
                             "scores trials on the val split and never reads the test split")
        if not data.path:
            raise UsageError("sweep: no annotations: give --data.path (or a --config with data.path)")

    @property
    def direction(self) -> str:
        return objective_direction(self.objective)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out_dir / 'study.db').resolve()}"

    @property
    def name(self) -> str:
        return self.study_name or self.out_dir.resolve().name


@dataclass
class SweepResult:
    out_dir: Path
    records: list[TrialRecord]
    best: TrialRecord | None
    stopped: str                    # why this command started no more trials
    ran: list[int] = field(default_factory=list)   # the trial numbers this command ran
    report: Path | None = None


def run_sweep(options: SweepOptions) -> SweepResult:
    """Run trials until the grid, `trials` or `max_minutes` says stop; write the tables and the report.
    A stop signal during a trial ends the sweep after that trial's current step (it is queued again)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("sweep: run one sweep process per GPU or machine (train.device cuda:N), each with the "
                         "same --storage, not one sweep under torchrun / accelerate launch")
    optuna = require("optuna", "sweep")
    optuna.logging.set_verbosity(optuna.logging.INFO if options.verbose else optuna.logging.ERROR)
    started = monotonic()
    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)
    classify = LabelledImages.read(options.classify_folder) if options.classify_folder else None
    storage = _open_storage(optuna, options.storage_url)
    study = _open_study(optuna, storage, options)
    say = options.say
    requeued = _requeue_dead_local_trials(study, storage)
    if requeued:
        say(f"sweep: trial(s) {', '.join(map(str, requeued))} were left running by a process that is gone: "
            "marked interrupted and queued again")
    worker = _this_worker()
    ran: list[int] = []
    stopped = ""

    def objective(trial) -> float:
        picked = options.space.suggest(trial)
        run_dir = out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("run_dir", str(run_dir))
        ran.append(trial.number)
        say(f"trial {trial.number}: {describe_params(picked)}  ->  {run_dir}")
        try:
            settings = options.space.resolve(picked, options.base)
            trial.set_user_attr("settings", settings)
            outcome = run_trial(trial_config(options.base, settings, run_dir), classify, options.progress)
            value = outcome.value(options.objective)
            if not math.isfinite(value):
                raise ValueError(f"{options.objective} is {value}")
        except (TrialInterrupted, KeyboardInterrupt) as err:
            _queue_rerun(study, trial.number, f"interrupted: {str(err) or type(err).__name__}")
            raise TrialInterrupted(str(err)) from err
        except Exception as err:  # a trial's own failure (bad combination, out of memory) must not end the sweep
            error = " ".join(f"{type(err).__name__}: {err}".split())
            trial.set_user_attr("error", error)
            log.debug("trial %d failed:\n%s", trial.number, traceback.format_exc())
            say(f"trial {trial.number} failed: {error}")
            raise TrialFailed(error) from err
        for key, attribute in outcome.attributes().items():
            trial.set_user_attr(key, attribute)
        zero_shot = outcome.zero_shot_metrics.get(options.objective)
        say(f"trial {trial.number}: {options.objective} {value:.4g}"
            + (f" (zero-shot {zero_shot:.4g})" if zero_shot is not None else "")
            + f"; {outcome.trainable_parameters:,} trainable parameters, {outcome.train_seconds:.1f} s training, "
              f"{outcome.pairs_per_second:.2f} pairs/s, peak memory {outcome.peak_memory_gb:.2f} GB")
        return value

    try:
        while not (stopped := _budget_spent(study, options, started)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(objective, n_trials=1, catch=(TrialFailed,))
            _write_tables(study, options)
    except (TrialInterrupted, KeyboardInterrupt):  # during a trial (queued again), or between two
        stopped = "interrupted: the trial is queued again; run the same command to continue"
    say(f"sweep: {stopped}")
    records = _write_tables(study, options)
    report = write_sweep_report(out, records, options.space, options.objective, options.direction,
                                _about(options), json.loads(json.dumps(options.base.to_dict())))
    done = [r for r in records if r.complete]
    best = max(done, key=lambda r: r.objective if options.direction == "maximize" else -r.objective, default=None)
    return SweepResult(out, records, best, stopped, ran, report)


# -- storage and study ----------------------------------------------------------------------------------


def redact(url: str) -> str:
    """A storage URL as it may be printed and written: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy reads: print nothing of it that could be a secret
        return url.split("@")[-1]


def _requeue_stale(study: Any, trial: Any) -> None:
    """Optuna's callback for a trial silent for GRACE_SECONDS (its machine died), which it has just failed."""
    _queue_rerun(study, trial.number, f"interrupted: no heartbeat from its worker for {GRACE_SECONDS} s")


def _open_storage(optuna: Any, url: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                              heartbeat_stale_trial_callback=_requeue_stale)
    except ModuleNotFoundError as err:  # the database's driver, e.g. psycopg2 for postgresql://
        raise UsageError(f"sweep --storage {redact(url)}: its database driver is not installed ({err}); for "
                         "PostgreSQL: pip install psycopg2-binary") from None
    except Exception as err:  # sqlalchemy's own errors: a bad URL, a database that cannot be reached
        raise UsageError(f"sweep --storage {redact(url)}: {type(err).__name__}: {err}") from None


def _open_study(optuna: Any, storage: Any, options: SweepOptions):
    samplers = {"grid": lambda seed: optuna.samplers.GridSampler(options.space.grid(), seed=seed),
                "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
                "random": lambda seed: optuna.samplers.RandomSampler(seed=seed)}
    study = optuna.create_study(storage=storage, study_name=options.name, direction=options.direction,
                                load_if_exists=True)
    wanted = {"space": options.space.raw, "objective": options.objective, "direction": options.direction}
    if not study.user_attrs:
        if (options.out_dir / "trials").is_dir() and any((options.out_dir / "trials").iterdir()):
            raise UsageError(f"sweep: {options.out_dir / 'trials'} holds run folders, but the study "
                             f"{options.name!r} in {redact(options.storage_url)} has no trials: use a new --out, "
                             "or the --storage those runs belong to")
        for key, value in wanted.items():
            study.set_user_attr(key, value)
    else:
        for key in STUDY_ATTRS:
            if study.user_attrs.get(key) != wanted[key]:
                raise UsageError(f"sweep: the study {options.name!r} in {redact(options.storage_url)} was started "
                                 f"with another {key} ({study.user_attrs.get(key)!r}); give the same one to resume "
                                 "it, or start a new sweep with another --out or --study")
    # Seeded by the trials so far: a resumed sweep must not draw the first sweep's samples again.
    study.sampler = samplers[options.sampler](options.base.train.seed + len(study.trials))
    return study


def _about(options: SweepOptions) -> dict[str, Any]:
    return {"study": options.name, "storage": redact(options.storage_url), "sampler": options.sampler,
            "space": options.space.raw}


def _write_tables(study: Any, options: SweepOptions) -> list[TrialRecord]:
    trials = study.get_trials(deepcopy=False)
    records = [record_from_trial(t, reruns(trials)) for t in trials]
    write_tables(options.out_dir, records, options.space.names, options.objective, options.direction,
                 _about(options))
    return records


# -- budgets ----------------------------------------------------------------------------------------------


def _budget_spent(study: Any, options: SweepOptions, started: float) -> str:
    """Why no new trial should start, or "" when one should."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    interrupted = reruns(trials)
    counted = [t for t in trials if t.state.is_finished() and t.number not in interrupted]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    if options.trials is not None and len(counted) + len(running) >= options.trials:
        return f"done: {len(counted)} of --trials {options.trials}" + (f" ({len(running)} running elsewhere)"
                                                                     if running else "")
    if options.sampler == "grid" and not waiting:
        points = options.space.grid_points()
        taken = {_key(t.params) for t in counted + running}
        if all(_key(point) in taken for point in points):
            return f"done: every one of the grid's {len(points)} points has a trial"
    minutes = (monotonic() - started) / 60
    if options.max_minutes is not None and minutes >= options.max_minutes:
        return (f"time: {minutes:.1f} minutes spent (--max-minutes {options.max_minutes:g}), so no new trial "
                f"starts; {len(counted)} trials done. Run the same command to continue")
    return ""


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((name, repr(value)) for name, value in params.items()))


# -- interrupted trials -------------------------------------------------------------------------------------


def _this_worker() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _process_gone(worker: dict[str, Any]) -> bool:
    """Whether the process that ran a trial on this machine has ended (a reused pid is another process)."""
    try:
        process = psutil.Process(worker["pid"])
        return process.create_time() != worker["started"] or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _requeue_dead_local_trials(study: Any, storage: Any) -> list[int]:
    """RUNNING trials whose process on this machine is gone (killed): failed, and queued again."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    requeued = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not isinstance(worker, dict) or worker.get("host") != host or not _process_gone(worker):
            continue
        try:  # one worker wins this; only the winner queues the rerun
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        if _queue_rerun(study, trial.number, "interrupted: its process was killed"):
            requeued.append(trial.number)
    return requeued


def _queue_rerun(study: Any, number: int, why: str) -> bool:
    """Queue trial `number`'s settings again, once; the rerun records which trial it reruns and why."""
    trials = study.get_trials(deepcopy=False)
    if number in reruns(trials):
        return False
    trial = next(t for t in trials if t.number == number)
    params = dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))
    if not params:  # it stopped before Optuna picked its settings: nothing to repeat
        return False
    study.enqueue_trial(params, user_attrs={"retry_of": number, "retry_reason": why})
    return True
