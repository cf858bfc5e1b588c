"""train.report_to: the reporters get the numbers the progress bar and the summary show."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from zo.commands import USAGE_EXIT, main
from zo.config import ConfigError
from zo.reporting import Reporters, check_reporters

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")


def test_csv_and_tensorboard_count_steps_as_the_progress_bar(tmp_path, capsys):
    reporters = ["csv"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    out = tmp_path / "run"
    args = [f"train.out={out}", "train.progress=false", f"train.report_to=[{','.join(reporters)}]"]
    assert main(["train", "--config", SMOKE, *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # smoke: 12 steps, logged every 2; the bar shows 0 before training and n after n updates
    assert [int(row["step"]) for row in rows] == [0, 2, 4, 6, 8, 10, 12]
    assert float(rows[0]["dev_score"]) == pytest.approx(summary["zero_shot_score"])
    assert float(rows[-1]["loss"]) == pytest.approx(summary["final_loss"])
    if "tensorboard" in reporters:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard")).Reload()
        assert [e.step for e in events.Scalars("loss")] == [2, 4, 6, 8, 10, 12]
        (zero_shot,) = events.Scalars("dev_score")
        assert zero_shot.step == 0
        assert zero_shot.value == pytest.approx(summary["zero_shot_score"])


def test_a_resumed_run_keeps_its_csv_rows_up_to_the_checkpoint(tmp_path):
    reporters = Reporters.open(["csv"], tmp_path, {}, start_step=0)
    for step in (0, 2, 4, 6):
        reporters.log(step, {"loss": step / 10, "ignored": "text"})
    reporters.close()
    Reporters.open(["csv"], tmp_path, {}, start_step=4).log(6, {"loss": 0.5})
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["step"], row["loss"]) for row in rows] == [
        ("0", "0.0"),
        ("2", "0.2"),
        ("4", "0.4"),
        ("6", "0.5"),
    ]


def test_only_rank_0_reports(tmp_path):
    reporters = Reporters.open(["csv"], tmp_path, {}, start_step=0, enabled=False)
    reporters.log(1, {"loss": 1.0})
    assert not (tmp_path / "metrics.csv").exists()


def test_a_missing_package_or_unknown_reporter_is_a_usage_error(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="pip install wandb"):
        check_reporters(["wandb"])
    with pytest.raises(ConfigError, match="unknown reporter 'mlflow'"):
        check_reporters(["csv", "mlflow"])
    out = tmp_path / "run"
    argv = ["train", "--config", SMOKE, f"train.out={out}", "train.report_to=[wandb]"]
    assert main(argv) == USAGE_EXIT
    assert "pip install wandb" in capsys.readouterr().err
    assert not out.exists()  # refused before the run directory is made


def test_nothing_is_reported_by_default():
    from zo.config import RunConfig

    assert RunConfig().train.report_to == []
