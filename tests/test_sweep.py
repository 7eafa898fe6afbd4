"""`cliptune sweep`: the space file (parsing, errors, grid, a trial's settings), the Pareto front, and
whole sweeps on a tiny CLIP: tables and report, failed trials, budgets, the test split never read, and
a sweep killed mid-trial that resumes without rerunning its finished trials."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from PIL import Image

from cliptune.apps.cli import main
from cliptune.config import ConfigError, UsageError, load_config
from cliptune.config_flags import dotted_values
from cliptune.sweep import study as sweep_study
from cliptune.sweep.pareto import pareto_front
from cliptune.sweep.space import load_space, parse_space
from cliptune.sweep.study import SweepOptions

REPO = Path(__file__).resolve().parents[1]
BASE = load_config(None)  # CLIP's defaults: lora.r 16, alpha 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded 2-core machine threads wait on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# -- the space file ---------------------------------------------------------------------------------------

SPACE = """
lora.r: [4, 8]
lora.alpha: {times: lora.r, values: [2]}
targets:
  attention: {lora.target_modules: [q_proj, k_proj, v_proj, out_proj]}
  mlp: {lora.target_modules: [fc1, fc2]}
towers:
  vision: {lora.text: frozen}
  both: {}
"""


def test_grid_is_every_combination_and_resolves_to_config_keys(tmp_path):
    space = load_space(_space(tmp_path, SPACE), BASE)
    assert space.names == ["lora.r", "lora.alpha/lora.r", "targets", "towers"]
    points = space.grid_points()
    assert len(points) == 2 * 1 * 2 * 2
    assert points[0] == {"lora.r": 4, "lora.alpha/lora.r": 2, "targets": "attention", "towers": "vision"}
    assert len({tuple(p.values()) for p in points}) == len(points)
    settings = space.resolve({"lora.r": 8, "lora.alpha/lora.r": 2, "targets": "mlp", "towers": "vision"}, BASE)
    assert settings == {"lora.r": 8, "lora.target_modules": ["fc1", "fc2"], "lora.text": "frozen", "lora.alpha": 16}
    config = load_config(None, settings)
    assert (config.lora.r, config.lora.alpha, config.lora.text, config.lora.vision) == (8, 16, "frozen", "lora")
    assert load_config(None, dotted_values(config)) == config  # how a trial's config is built from the base


def test_multiple_of_a_key_the_space_does_not_sweep_uses_the_base_value_and_can_fail_later(tmp_path):
    space = parse_space({"lora.alpha": {"times": "lora.r", "values": [0.5, 3]}}, BASE)
    assert space.resolve({"lora.alpha/lora.r": 3}, BASE) == {"lora.alpha": 48}  # base r = 16
    odd = load_config(None, {"lora.r": 5})
    halved = space.resolve({"lora.alpha/lora.r": 0.5}, odd)
    assert halved == {"lora.alpha": 2.5}
    with pytest.raises(ConfigError, match="lora.alpha: expected an integer, got 2.5"):  # the trial's error
        load_config(None, {"lora.r": 5, **halved})


def test_ranges_list_values_and_lists_of_lists(tmp_path):
    space = parse_space({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                         "lora.r": {"low": 2, "high": 32},
                         "lora.target_modules": [["q_proj", "v_proj"], None]}, BASE)
    lr, r, targets = space.dimensions
    assert (lr.kind, lr.log, lr.integer) == ("range", True, False)
    assert (r.kind, r.integer) == ("range", True)
    assert targets.options == ("[q_proj, v_proj]", None)  # what Optuna stores: scalars
    assert space.resolve({"train.lr": 1e-3, "lora.r": 4, "lora.target_modules": "[q_proj, v_proj]"}, BASE) == {
        "train.lr": 1e-3, "lora.r": 4, "lora.target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ConfigError, match=r"a grid needs lists, and train.lr, lora.r is a \{low, high\} range"):
        space.grid()


@pytest.mark.parametrize("text, message", [
    ("lora.rank: [4, 8]", "unknown config key 'lora.rank'; did you mean 'lora.r'?"),
    ("lora.r: [4, eight]", "lora.r: expected an integer, got 'eight'"),
    ("lora.r: [0, 4]", "lora.r: 0 must be >= 1"),
    ("lora.r: 8", "lora.r: expected a list of values, a range"),
    ("lora.r: []", "lora.r: the list of values is empty"),
    ("lora.r: [4, 4]", "the value 4 is listed twice"),
    ("train.lr: {lo: 1.0e-4, high: 1.0e-2}", "unknown field 'lo'; did you mean 'low'?"),
    ("train.lr: {low: 1.0e-2, high: 1.0e-4}", "low 0.01 must be below high 0.0001"),
    ("train.lr: {low: 0, high: 1.0e-2, log: true}", "a log range needs low > 0"),
    ("lora.vision: {low: 1, high: 2}", "a range needs a numeric setting"),
    ("lora.target_modules: [q_proj, v_proj]", "holds a list, so each value is a list: write a list of lists"),
    ("lora.alpha: {times: lora.rr, values: [2]}", "unknown config key 'lora.rr'; did you mean 'lora.r'?"),
    ("lora.alpha: {times: lora.vision, values: [2]}", "lora.vision is not a number"),
    ("lora.alpha: {times: lora.r, values: [0]}", "a list of positive factors"),
    ("lora: {r: [4, 8]}", "lora is a config section: spell a swept key section.key"),
    ("towers: [vision, text]", "a name without a dot is a named choice"),
    ("towers: {vision: {lora.txt: frozen}}", "towers: vision: unknown config key 'lora.txt'; did you mean 'lora.text'?"),
    ("towers: {vision: {lora.text: frozn}}", "towers: vision: lora.text: 'frozn' is not one of"),
    ("towers: {vision: {lora.text: frozen}}\nlora.text: [lora]", "lora.text is set by both 'towers' and 'lora.text'"),
    ("train.output_dir: [a, b]", "train.output_dir is set by the sweep"),
    ("[1, 2]", "expected a mapping of swept settings"),
])
def test_a_bad_space_is_one_line_naming_the_file_and_the_entry(tmp_path, text, message):
    path = _space(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_space(path, BASE)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_the_packaged_spaces_are_found_anywhere_and_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clip = load_space("configs/sweep_lora_space.yaml", BASE)
    assert {"lora.r", "targets", "towers"} <= set(clip.names)
    demo_base = load_config("configs/coco_mini_tiny.yaml")
    demo = load_space("configs/sweep_demo_space.yaml", demo_base)
    assert len(demo.grid_points()) >= 6


# -- the Pareto front --------------------------------------------------------------------------------------


def _dominated_brute_force(points, maximize):
    sign = 1 if maximize else -1
    return [any(c2 <= c and sign * s2 >= sign * s and (c2 < c or sign * s2 > sign * s) for c2, s2 in points)
            for c, s in points]


@pytest.mark.parametrize("maximize", [True, False])
def test_pareto_front_matches_a_brute_force_reference(maximize):
    rng = random.Random(0)
    for _ in range(200):
        # Few distinct values, so equal costs, equal scores and duplicate points are common.
        points = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        front = pareto_front([c for c, _ in points], [s for _, s in points], maximize=maximize)
        assert front == [not d for d in _dominated_brute_force(points, maximize)], points


# -- whole sweeps on a tiny CLIP --------------------------------------------------------------------------


def _coco(root: Path) -> Path:
    """COCO captions files per split (captions_{split}.json), images in images/: train 8, val 4, and a
    test split that a sweep must never read."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    (root / "images").mkdir(parents=True)
    number = 0
    for split, count in {"train": 8, "val": 4, "test": 4}.items():
        images, annotations = [], []
        for i in range(count):
            number += 1
            name = list(colours)[i % len(colours)]
            file_name = f"{split}_{number:03d}.png"
            Image.new("RGB", (40 + i, 36), colours[name]).save(root / "images" / file_name)
            images.append({"id": number, "file_name": file_name})
            annotations += [{"id": number * 10 + k, "image_id": number, "caption": f"a {name} picture, view {k}"}
                            for k in range(2)]
        (root / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root / "captions_{split}.json"


def _labelled_folder(root: Path) -> Path:
    for name, colour in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (36, 36 + i), colour).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory) -> Path:
    return _coco(tmp_path_factory.mktemp("coco-splits"))


def _flags(model_dir: Path, data: Path, max_steps: int = 2) -> list[str]:
    return ["--model.name", str(model_dir), "--data.path", str(data), "--data.num_workers", "0",
            "--train.max_steps", str(max_steps), "--train.micro_batch_size", "4", "--train.grad_accum_steps", "1",
            "--train.save_every", "0", "--train.report_to", "none", "--train.device", "cpu"]


class OpenedFiles:
    """Every file this process opens, from Python's audit hooks (PIL, json and PEFT all open through them)."""

    recording: list[str] | None = None
    installed = False

    def __enter__(self) -> list[str]:
        if not OpenedFiles.installed:  # an audit hook cannot be removed: one, switched on and off
            sys.addaudithook(lambda event, args: OpenedFiles.recording is not None and event == "open"
                             and isinstance(args[0], (str, Path)) and OpenedFiles.recording.append(str(args[0])))
            OpenedFiles.installed = True
        OpenedFiles.recording = []
        return OpenedFiles.recording

    def __exit__(self, *exc) -> None:
        OpenedFiles.recording = None


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_sweep_writes_trials_and_report_records_failures_and_never_reads_the_test_split(
        tiny_clip_dir, coco_data, tmp_path, capsys):
    space = _space(tmp_path, "lora.r: [2, 4]\nlora.alpha: {times: lora.r, values: [2]}\n"
                             "layers:\n  attention: {lora.target_modules: [q_proj, v_proj]}\n"
                             "  missing: {lora.target_modules: [no_such_layer]}\n")
    out = tmp_path / "sweep"
    with OpenedFiles() as opened:
        code = main(["sweep", "--space", str(space), "--out", str(out), "--classify-folder",
                     str(_labelled_folder(tmp_path / "labelled")), *_flags(tiny_clip_dir, coco_data)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = [Path(name).name for name in opened if Path(name).parent in (coco_data.parent, coco_data.parent / "images")]
    assert {"captions_train.json", "captions_val.json"} <= set(data)  # the hook sees what the sweep reads...
    assert any(name.startswith("val_") for name in data) and any(name.startswith("train_") for name in data)
    assert not [name for name in data if "test" in name], "the sweep read the test split"  # ...and no test file

    rows = _rows(out)
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    complete = [r for r in rows if r["state"] == "complete"]
    failed = [r for r in rows if r["state"] == "failed"]
    assert [r["layers"] for r in complete] == ["attention"] * 2 and [r["layers"] for r in failed] == ["missing"] * 2
    assert all("no_such_layer" in r["error"] and "ConfigError" in r["error"] for r in failed)
    assert [float(r["rsum"]) for r in complete] == sorted((float(r["rsum"]) for r in complete), reverse=True)
    assert rows[:2] == complete  # best first, failed after
    for row in complete:
        run = Path(row["run_dir"])
        config = load_config(run / "config.yaml")
        assert config.lora.alpha == 2 * config.lora.r == 2 * int(row["lora.r"])
        assert config.lora.target_modules == ["q_proj", "v_proj"]
        fine_tuned = json.loads((run / "metrics.json").read_text())
        assert float(row["rsum"]) == pytest.approx(fine_tuned["fine-tuned"]["rsum"])
        assert float(row["zero_shot_rsum"]) == pytest.approx(fine_tuned["zero-shot"]["rsum"])
        for column in ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
                       "text_to_image_R@5", "text_to_image_R@10"):
            assert float(row[column]) == pytest.approx(fine_tuned["fine-tuned"][column])
        assert int(row["trainable_parameters"]) > 0 and float(row["train_seconds"]) > 0
        assert float(row["pairs_per_second"]) > 0 and float(row["peak_memory_gb"]) > 0
        assert float(row["forgetting"]) == pytest.approx(
            float(row["base_zeroshot_classification_accuracy"]) - float(row["zeroshot_classification_accuracy"]))
    assert int(complete[0]["trainable_parameters"]) != int(complete[1]["trainable_parameters"])  # r 2 vs 4
    document = json.loads((out / "trials.json").read_text())
    assert document["objective"] == "rsum" and document["sampler"] == "grid"
    assert [t["number"] for t in document["trials"]] == [int(r["trial"]) for r in rows]

    report = (out / "report.md").read_text()
    for figure in ("pareto.png", "effects.png"):
        assert (out / figure).stat().st_size > 10_000 and f"]({figure})" in report
    assert "On the Pareto front" in report and "no_such_layer" in report
    assert (out / "report.html").is_file()
    assert "failed: ConfigError: lora.target_modules: none of ['no_such_layer']" in printed
    assert "sweep: done: every one of the grid's 4 points has a trial" in printed


def test_objective_sampler_and_split_are_checked_before_any_trial(tiny_clip_dir, coco_data, tmp_path):
    base = load_config(None, {"data.path": str(coco_data)})
    space = parse_space({"train.lr": {"low": 1e-4, "high": 1e-2}}, base)
    with pytest.raises(UsageError, match="--objective 'rsun': not a metric; did you mean 'rsum'"):
        SweepOptions(base=base, space=space, out_dir=tmp_path, objective="rsun", trials=2)
    with pytest.raises(UsageError, match="forgetting"):  # only with --classify-folder
        SweepOptions(base=base, space=space, out_dir=tmp_path, objective="forgetting", trials=2)
    with pytest.raises(UsageError, match="give --trials N or --max-minutes M"):
        SweepOptions(base=base, space=space, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="a grid needs lists"):
        SweepOptions(base=base, space=space, out_dir=tmp_path, sampler="grid")
    same = load_config(None, {"data.path": str(coco_data), "data.val_split": "test"})
    with pytest.raises(UsageError, match="never reads the test split"):
        SweepOptions(base=same, space=space, out_dir=tmp_path, trials=2)
    assert SweepOptions(base=base, space=space, out_dir=tmp_path, trials=2).sampler == "tpe"  # auto, with a range
    assert main(["sweep", "--space", str(_space(tmp_path, "lora.r: [2]")), "--out", str(tmp_path / "x"),
                 "--objective", "R@1", *_flags(tiny_clip_dir, coco_data)]) == 2
    assert not (tmp_path / "x").exists()


# Trials that fail at once (no layer of that name), so budgets are tested in a second each.
FAILING = "missing:\n  gone: {lora.target_modules: [no_such_layer]}\n"


def test_trials_is_the_size_of_the_study_and_a_rerun_adds_only_the_rest(tiny_clip_dir, coco_data, tmp_path):
    space = _space(tmp_path, "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n" + FAILING)
    out = tmp_path / "sampled"
    base = _flags(tiny_clip_dir, coco_data)
    command = ["sweep", "--space", str(space), "--out", str(out), "--sampler", "random", *base]
    assert main([*command, "--trials", "3"]) == 0
    first = {int(r["trial"]): r["train.lr"] for r in _rows(out)}
    assert sorted(first) == [0, 1, 2]
    assert main([*command, "--trials", "5"]) == 0
    rows = {int(r["trial"]): r for r in _rows(out)}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert {n: rows[n]["train.lr"] for n in first} == first  # the first three are the same trials
    lrs = [float(r["train.lr"]) for r in rows.values()]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 5  # a resumed sampler draws anew
    assert all(r["state"] == "failed" for r in rows.values())
    assert main([*command, "--trials", "5"]) == 0 and len(_rows(out)) == 5  # nothing left to do


def test_max_minutes_starts_no_trial_after_the_time_and_says_so(tiny_clip_dir, coco_data, tmp_path, monkeypatch,
                                                               capsys):
    clock = iter([0.0, 0.0, 30.0, 90.0, 90.0])  # seconds: start, check 1, check 2, check 3 (over), spare
    monkeypatch.setattr(sweep_study, "monotonic", lambda: next(clock))
    space = _space(tmp_path, "lora.r: [2, 4, 8]\n" + FAILING)
    out = tmp_path / "timed"
    assert main(["sweep", "--space", str(space), "--out", str(out), "--max-minutes", "1",
                 *_flags(tiny_clip_dir, coco_data)]) == 0
    assert len(_rows(out)) == 2  # started at 0 s and 30 s; at 90 s none
    assert "sweep: time: 1.5 minutes spent (--max-minutes 1), so no new trial starts; 2 trials done" \
        in capsys.readouterr().out


def test_a_resumed_sweep_refuses_another_space_or_objective(tiny_clip_dir, coco_data, tmp_path):
    out = tmp_path / "once"
    command = ["sweep", "--out", str(out), *_flags(tiny_clip_dir, coco_data)]
    assert main([*command, "--space", str(_space(tmp_path, FAILING))]) == 0
    other = tmp_path / "other.yaml"
    other.write_text("lora.r: [2]\n" + FAILING)
    assert main([*command, "--space", str(other)]) == 2
    assert main([*command, "--space", str(_space(tmp_path, FAILING)), "--objective", "val_loss"]) == 2


def test_ctrl_c_queues_the_running_trial_again_and_exits_130(tiny_clip_dir, coco_data, tmp_path, monkeypatch,
                                                           capsys):
    real = sweep_study.run_trial
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(args[0].train.output_dir)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_study, "run_trial", interrupted_once)
    out = tmp_path / "ctrl-c"
    command = ["sweep", "--space", str(_space(tmp_path, FAILING)), "--out", str(out),
               *_flags(tiny_clip_dir, coco_data)]
    assert main(command) == 130
    assert "sweep: interrupted: the trial is queued again; run the same command to continue" in capsys.readouterr().out
    assert [r["state"] for r in _rows(out)] == ["interrupted", "waiting"]
    assert main(command) == 0
    rows = _rows(out)
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "interrupted"), ("1", "failed")]
    assert rows[0]["error"] == "interrupted: KeyboardInterrupt; rerun as trial 1"
    assert calls == [str(out / "trials" / "0000"), str(out / "trials" / "0001")]


def test_a_sweep_killed_mid_trial_resumes_without_rerunning_finished_trials(tiny_clip_dir, coco_data, tmp_path,
                                                                           capsys):
    space = _space(tmp_path, "lora.r: [2, 4]\n")
    out = tmp_path / "killed"
    command = ["sweep", "--space", str(space), "--out", str(out), *_flags(tiny_clip_dir, coco_data, max_steps=3)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cliptune", *command], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    second = out / "trials" / "0001"
    deadline = time.monotonic() + 240
    while not second.exists():  # trial 0 has finished: trial 1 is running
        assert process.poll() is None, f"the sweep exited early: {process.stdout.read()[-2000:]}"
        assert time.monotonic() < deadline, "trial 1 never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished = out / "trials" / "0000" / "metrics.json"
    before = (finished.stat().st_mtime_ns, finished.read_bytes())
    storage = f"sqlite:///{out / 'study.db'}"
    states = [t.state.name for t in optuna.load_study(study_name="killed", storage=storage).trials]
    assert states == ["COMPLETE", "RUNNING"]

    assert main(command) == 0  # the same command again
    printed = capsys.readouterr().out
    assert "trial(s) 1 were left running by a process that is gone: marked interrupted and queued again" in printed
    assert (finished.stat().st_mtime_ns, finished.read_bytes()) == before  # trial 0 was not rerun
    trials = optuna.load_study(study_name="killed", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].user_attrs == {**trials[2].user_attrs, "retry_of": 1,
                                    "retry_reason": "interrupted: its process was killed"}
    assert trials[2].params == trials[1].params
    assert {t.params["lora.r"] for t in (trials[0], trials[2])} == {2, 4}
    rows = {r["trial"]: r for r in _rows(out)}
    assert rows["1"]["state"] == "interrupted" and rows["0"]["state"] == rows["2"]["state"] == "complete"
    assert rows["1"]["error"] == "interrupted: its process was killed; rerun as trial 2"
    assert main(command) == 0  # finished: a third run starts nothing
    assert len(optuna.load_study(study_name="killed", storage=storage).trials) == 3


def test_the_trials_table_is_sorted_by_the_objective_direction(tmp_path):
    from cliptune.sweep.table import TrialRecord, sort_records

    records = [TrialRecord(n, "complete", {}, {}, {}, objective=v) for n, v in [(0, 3.0), (1, 1.0), (2, 2.0)]]
    records.append(TrialRecord(3, "failed", {}, {}, {}, error="boom"))
    assert [r.number for r in sort_records(records, maximize=True)] == [0, 2, 1, 3]
    assert [r.number for r in sort_records(records, maximize=False)] == [1, 2, 0, 3]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_an_earlier_trial_freed_goes_back_before_the_next_trial_is_measured():
    # On a CPU a trial's peak memory is the process's resident set; glibc keeps small freed chunks, so
    # without this every trial after a big one reported the big one's peak (3.4 GB for a 1.6 GB trial).
    import psutil
    import torch

    from cliptune.sweep.trial import release_freed_memory

    resident = lambda: psutil.Process().memory_info().rss  # noqa: E731
    chunks = [torch.ones(16_000) for _ in range(4000)]  # 64 KB each (below glibc's mmap threshold): 256 MB
    full = resident()
    del chunks
    release_freed_memory()
    assert resident() < full - 150 * 2**20


def test_storage_urls_are_printed_without_their_password():
    assert sweep_study.redact("postgresql://me:secret@db.example/sweeps") == "postgresql://me:***@db.example/sweeps"
