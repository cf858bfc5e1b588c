"""`zo tune` on the tiny smoke config: halving by the recorded dev loss, best.yaml that
trains, the flat report, resume of a killed tune (equal to an uninterrupted one), bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

import zo.train
from zo.cli import main
from zo.config import load_config
from zo.tune import FLAT_MESSAGE, TuneOptions, choose_winner, parse_axis, tune

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")
BUDGET = ["--rungs", "2", "--steps", "2", "--lr", "1e-9,0.01,0.1"]


def write_one_label_task(directory: Path) -> list[str]:
    """A task whose dev loss any working setting lowers on every batch: all labels agree."""
    directory.mkdir(parents=True, exist_ok=True)
    words = ["the film", "a movie", "this story", "our plot", "that show", "one scene"]
    for split in ("train", "dev"):
        rows = [{"text": f"{words[i % 6]} number {i}", "label": "pos"} for i in range(32)]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        "task.name=jsonl",
        f"task.path={directory}",
        "task.template={text} Review:",
        "task.label=label",
        'task.verbalizer={pos: " good", neg: " bad"}',
        "estimator={name: sgd, lr: 0.01}",
    ]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> list[str]:
    return write_one_label_task(tmp_path_factory.mktemp("data") / "one-label")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, task) -> Path:
    out = tmp_path_factory.mktemp("tunes") / "sgd"
    assert main(["tune", "--config", SMOKE, "--out", str(out), *BUDGET, *task]) == 0
    return out


def state(out: Path) -> dict:
    return json.loads((out / "tune.json").read_text())


def test_halving_keeps_the_best_by_the_recorded_dev_loss(tuned):
    recorded = state(tuned)
    rung0, rung1 = recorded["rungs"]["0"], recorded["rungs"]["1"]
    assert sorted(rung0) == ["cand-00", "cand-01", "cand-02"]
    by_loss = sorted(rung0, key=lambda name: rung0[name]["dev_loss"])
    assert sorted(rung1) == sorted(by_loss[:2])  # ceil(3 / 2) survive
    assert all(r["steps"] == 2 for r in rung0.values()) and all(
        r["steps"] == 4 for r in rung1.values()
    )
    winner = min(rung1, key=lambda name: rung1[name]["dev_loss"])
    assert recorded["winner"] == winner and rung1[winner]["moved"]
    assert not rung0["cand-00"]["moved"]  # lr 1e-9: within noise of zero-shot
    rows = list(csv.DictReader((tuned / "candidates.csv").open()))
    assert rows[0]["candidate"] == winner and rows[0]["status"] == "winner"
    assert len(rows) == 3 and (tuned / "candidates.png").is_file()


def test_best_yaml_trains(tuned, tmp_path):
    best = load_config(tuned / "best.yaml")
    winner = next(c for c in state(tuned)["candidates"] if c["name"] == state(tuned)["winner"])
    assert best.estimator["lr"] == winner["lr"] and best.estimator["name"] == "sgd"
    run = tmp_path / "best"
    args = ["train", "--config", str(tuned / "best.yaml"), f"train.out={run}", "train.steps=2"]
    assert main([*args, "train.progress=false"]) == 0
    assert (run / "summary.json").is_file()


def test_a_second_tune_on_the_same_directory_retrains_nothing(tuned, task, monkeypatch, capsys):
    before = (tuned / "tune.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished tune must not train again")

    monkeypatch.setattr(zo.train, "train", no_training)
    assert main(["tune", "--config", SMOKE, "--out", str(tuned), *BUDGET, *task]) == 0
    assert (tuned / "tune.json").read_text() == before


def test_killed_tune_resumes_to_the_uninterrupted_result(tuned, task, tmp_path):
    config = load_config(SMOKE, task)
    options = TuneOptions(rungs=2, steps=2, lr=parse_axis("1e-9,0.01,0.1", "lr"))
    calls = []

    def killed_in_the_third_run(run_config, log=print):
        calls.append(run_config.train.out)
        if len(calls) == 3:  # the third candidate dies after 1 of its 2 steps
            short = dataclasses.replace(run_config.train, steps=1)
            zo.train.train(dataclasses.replace(run_config, train=short), log=log)
            raise KeyboardInterrupt
        return zo.train.train(run_config, log=log)

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        tune(config, out, options, log=lambda line: None, train_fn=killed_in_the_third_run)
    assert set(state(out)["rungs"]["0"]) == {"cand-00", "cand-01"}
    result = tune(config, out, options, log=lambda line: None)
    reference = state(tuned)
    for rung, results in reference["rungs"].items():
        assert set(result.state["rungs"][rung]) == set(results)
        for name, expected in results.items():
            assert result.state["rungs"][rung][name]["batch_losses"] == expected["batch_losses"]
    assert result.winner == reference["winner"]


def test_flat_tune_reports_and_writes_no_best_yaml(tmp_path, capsys):
    out = tmp_path / "flat"
    args = ["--rungs", "1", "--steps", "1", "--lr", "1e-9", "train.progress=false"]
    assert main(["tune", "--config", SMOKE, "--out", str(out), *args]) == 3
    assert FLAT_MESSAGE in capsys.readouterr().out
    assert not (out / "best.yaml").exists() and state(out)["winner"] is None


def test_the_winner_is_the_lowest_dev_loss_that_moved_beyond_noise():
    # measured on SmolLM2 block_zo: lr 1e-2 had the lowest dev loss but within noise, lr 3e-3
    # moved it; reporting "no setting moved" there was false
    final = {
        "cand-03": {"dev_loss": 0.83, "improvement": 0.27, "noise": 0.29, "moved": False},
        "cand-02": {"dev_loss": 0.93, "improvement": 0.18, "noise": 0.11, "moved": True},
        "cand-04": {"dev_loss": 1.50, "improvement": -0.40, "noise": 0.12, "moved": False},
    }
    assert choose_winner(final) == "cand-02"
    final["cand-02"]["moved"] = False
    assert choose_winner(final) is None


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "missing.yaml"],
        ["--config", SMOKE, "--lr", "abc"],
        ["--config", SMOKE, "--lr", "1e-2:1e-4"],
        ["--config", SMOKE, "--candidates", "0"],
        ["--config", SMOKE, "--eta", "1"],
        ["--config", SMOKE, "train.lr_schedule=linear"],
        ["--config", SMOKE, "--eps", "1e-3", "estimator={name: sgd, lr: 0.1}"],
        ["--config", SMOKE, "--scale", "sideways"],
    ],
)
def test_bad_input_exits_2_before_training(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(zo.train, "train", lambda *a, **k: pytest.fail("trained"))
    assert main(["tune", "--out", str(tmp_path / "t"), *args]) == 2
    assert "zo: error:" in capsys.readouterr().err


def test_other_settings_on_a_tune_directory_exit_2_and_change_nothing(tuned, task, capsys):
    before = (tuned / "tune.json").read_text()
    args = ["--rungs", "2", "--steps", "3", "--lr", "1e-9,0.01,0.1", *task]
    assert main(["tune", "--config", SMOKE, "--out", str(tuned), *args]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (tuned / "tune.json").read_text() == before


def test_a_directory_that_is_not_a_tune_is_refused(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["tune", "--config", SMOKE, "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
