"""Run directories written by an earlier release still resume and replay bit for bit.

`tests/data/legacy_runs/` holds small runs made by zo at commit a36c17c (trajectory format 1,
engine version 1) on the tiny smoke config, norms trainable: `<estimator>-complete` trained 8
steps, `<estimator>-at4` the same run stopped after 4. Later format or engine changes must keep
reading them; refusing one would strand every run users have on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zo.cli import main

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_runs"
ESTIMATORS = ("zo_sgd", "zo_adam")


def trained(run: Path) -> dict:
    return load_file(str(run / "checkpoint" / "trainable.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def copy_of(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(LEGACY / name, tmp_path / name))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_legacy_run_replays_bit_identically(estimator, tmp_path):
    run = copy_of(f"{estimator}-complete", tmp_path)
    assert main(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    replayed = load_file(str(tmp_path / "replayed" / "trainable.safetensors"))
    assert_same_tensors(replayed, trained(LEGACY / f"{estimator}-complete"))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_legacy_run_resumes_to_the_uninterrupted_weights(estimator, tmp_path):
    run = copy_of(f"{estimator}-at4", tmp_path)
    overrides = [f"train.out={run}", "train.steps=8", "resume=true", "train.progress=false"]
    assert main(["train", "--config", str(run / "config.yaml"), *overrides]) == 0
    assert_same_tensors(trained(run), trained(LEGACY / f"{estimator}-complete"))
