"""metrics.jsonl counts steps as the progress bar does (format 2), and runs written before
(format 1: 0-based, no zero-shot line, no ``metrics_format`` in the header) still read,
resume and compare as they were."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from zo.commands import main
from zo.commands.compare import _losses
from zo.metrics_log import read_metrics
from zo.run_directory import RunDirectory

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")
LEGACY = ROOT / "tests" / "data" / "legacy_runs"
QUIET = ["train.progress=false"]


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(out: Path, *overrides: str) -> None:
    assert main(["train", "--config", SMOKE, f"train.out={out}", *QUIET, *overrides]) == 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("metrics") / "smoke"
    train(out, "train.report_to=[csv]")
    return out


def test_metrics_jsonl_counts_as_the_progress_bar_and_the_csv_reporter(smoke):
    logged = lines(smoke)
    summary = json.loads((smoke / "summary.json").read_text())
    with open(smoke / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert RunDirectory(smoke).header()["metrics_format"] == 2
    # smoke: 12 steps logged every 2; step 0 is the zero-shot score before any update
    assert [line["step"] for line in logged] == [int(row["step"]) for row in rows]
    assert [line["step"] for line in logged] == [0, 2, 4, 6, 8, 10, 12]
    assert logged[0] == {"step": 0, "dev_score": summary["zero_shot_score"]}
    assert logged[-1]["loss"] == summary["final_loss"]
    assert read_metrics(smoke) == logged  # format 2 is read as written
    assert _losses(smoke) == [(line["step"], line["loss"]) for line in logged[1:]]


def test_a_resumed_run_neither_repeats_nor_drops_a_line(smoke, tmp_path):
    run = tmp_path / "run"
    train(run, "train.steps=6")  # checkpoint at 4 (save_every) and at 6 (the end)
    with open(run / "metrics.jsonl", "a") as handle:  # a kill after logging past step 6
        handle.write(json.dumps({"step": 8, "loss": 9.0}) + "\n")
    train(run, "train.steps=12", "resume=true")
    assert measured_apart(lines(run)) == measured_apart(lines(smoke))  # resume is bit-exact


def measured_apart(logged: list[dict]) -> list[dict]:
    """The lines without what is measured (time, memory), which differs between runs."""
    return [
        {k: v for k, v in line.items() if k not in ("seconds", "peak_memory_bytes")}
        for line in logged
    ]


def test_a_run_started_over_from_step_0_logs_its_zero_shot_line_once(tmp_path):
    run = tmp_path / "run"
    train(run, "train.steps=4", "train.save_every=0")
    for folder in run.glob("checkpoint*"):  # killed before its first checkpoint
        shutil.rmtree(folder)
    train(run, "train.steps=4", "train.save_every=0", "resume=true")
    assert [line["step"] for line in lines(run)] == [0, 2, 4]


@pytest.mark.parametrize("estimator", ["zo_sgd", "zo_adam"])
def test_a_format_1_run_resumes_in_its_own_numbering_and_reads_as_format_2(estimator, tmp_path):
    complete = LEGACY / f"{estimator}-complete"
    run = Path(shutil.copytree(LEGACY / f"{estimator}-at4", tmp_path / "run"))
    assert "metrics_format" not in RunDirectory(run).header()
    with open(run / "metrics.jsonl", "a") as handle:  # logged past the checkpoint at 4
        handle.write(json.dumps({"step": 5, "loss": 9.0}) + "\n")
    argv = ["train", "--config", str(run / "config.yaml"), f"train.out={run}"]
    assert main([*argv, "train.steps=8", "resume=true", *QUIET]) == 0
    assert "metrics_format" not in RunDirectory(run).header()  # the file keeps one numbering
    assert [line["step"] for line in lines(run)] == [line["step"] for line in lines(complete)]
    assert [line["step"] for line in lines(run)] == [1, 3, 5, 7]
    assert [line["loss"] for line in lines(run)] == [line["loss"] for line in lines(complete)]
    assert [line["step"] for line in read_metrics(run)] == [2, 4, 6, 8]
    assert [step for step, _ in _losses(complete)] == [2, 4, 6, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] == lines(complete)[-1]["loss"]
