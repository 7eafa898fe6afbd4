"""The run log: metrics.jsonl (records, truncation on resume) and the trackers of `train.report_to`
through Accelerate (TensorBoard events written; a tracker that is not installed refused up front)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from accelerate import Accelerator

from cliptune.config import ConfigError, load_config
from cliptune.training.run_log import RunLog, trackers

RECORDS = [{"step": 1, "epoch": 0, "train_loss": 2.5, "lr": 1e-4, "pairs_per_second": 30.0},
           {"step": 2, "epoch": 0, "train_loss": 2.25, "lr": 2e-4, "pairs_per_second": 31.0},
           {"step": 2, "val_loss": 2.0, "val_image_to_text_R@1": 50.0},
           {"step": 3, "epoch": 1, "train_loss": float("nan"), "lr": 3e-4, "pairs_per_second": 29.0}]


def run_log_for(tmp_path, report_to):
    config = load_config(None, {"train.output_dir": str(tmp_path / "run"), "train.report_to": report_to})
    (tmp_path / "run").mkdir()
    log = RunLog(Accelerator(log_with=trackers(config.train) or None), tmp_path / "run")
    log.start(config)
    for record in RECORDS:
        log.log(record)
    log.close()
    return log


def test_tensorboard_gets_every_number_of_every_record(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_log_for(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "lr", "pairs_per_second", "val_loss", "val_image_to_text_R@1", "epoch"):
        expected = [(r["step"], r[key]) for r in RECORDS if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        for (_, value), (_, want) in zip(got, expected):
            assert value == pytest.approx(want, rel=1e-6, nan_ok=True), key


def test_metrics_jsonl_holds_the_records_and_none_writes_no_tracker_files(tmp_path):
    log = run_log_for(tmp_path, "none")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(r) for r in RECORDS]
    assert [json.dumps(r) for r in log.history()] == lines
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


def test_truncate_keeps_the_records_up_to_the_resumed_step_byte_for_byte(tmp_path):
    log = run_log_for(tmp_path, "none")
    before = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    log.truncate(2)
    after = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8")
    assert after == "".join(before[:3])  # steps 1, 2 and step 2's validation; step 3 will be written again


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads(tracker, tmp_path):
    from cliptune.training.recipe import Trainer

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    # A model that does not exist: a refusal after loading it would fail differently.
    config = load_config(None, {"model.name": str(tmp_path / "no-model"), "train.device": "cpu",
                                "train.report_to": ["tensorboard", tracker], "train.report": False})
    with pytest.raises(ConfigError) as err:
        Trainer(config)
    message = str(err.value)
    assert "\n" not in message and "train.report_to" in message and f"pip install {tracker}" in message


def test_cli_train_with_wandb_missing_exits_2_with_one_line(tmp_path, capsys):
    from cliptune.apps.cli import main

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    code = main(["train", "--model.name", str(tmp_path / "no-model"), "--data.path", str(tmp_path / "none.jsonl"),
                 "--train.report_to", "wandb", "--train.output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "pip install wandb" in err[0]
    assert not (tmp_path / "run").exists()


def test_report_to_values_are_checked_at_load():
    assert load_config(None, {"train.report_to": "tensorboard, mlflow"}).train.report_to == ["tensorboard", "mlflow"]
    assert load_config(None, {}).train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"train.report_to\[0\]: 'tensorbord' is not one of "
                                          r".*did you mean 'tensorboard'\?"):
        load_config(None, {"train.report_to": "tensorbord"})
    with pytest.raises(ConfigError, match=r"train.report_to: .* none beside a tracker"):
        load_config(None, {"train.report_to": ["none", "wandb"]})


def test_only_the_main_process_writes_or_truncates_metrics_jsonl(tmp_path):
    class OtherRank:  # what RunLog reads of an Accelerator on rank 1
        is_main_process = False
        trackers: list = []

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "train_loss": 1.0}\n', encoding="utf-8")
    log = RunLog(OtherRank(), tmp_path)
    log.truncate(2)  # rank 0 truncates the shared file; a second writer could tear it
    log.log({"step": 6, "train_loss": 0.5})
    assert path.read_text(encoding="utf-8") == '{"step": 5, "train_loss": 1.0}\n'


def test_without_tensorboard_the_default_logs_to_metrics_jsonl_only_and_says_so(monkeypatch, caplog):
    """TensorBoard comes with the `report` extra; the default report_to must not stop a base install."""
    from cliptune.training import run_log

    monkeypatch.setitem(run_log._AVAILABLE, "tensorboard", lambda: False)
    with caplog.at_level("WARNING"):
        assert trackers(load_config(None, {}).train) == []
    assert "no TensorBoard logging" in caplog.text and "pip install 'cliptune[report]'" in caplog.text
