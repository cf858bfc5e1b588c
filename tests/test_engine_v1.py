"""Runs made by version 1 of the engine keep replaying and resuming bit for bit.

``tests/data/engine_v1`` was written by zo a36c17c (engine version 1, before the generators
by global coordinates): ``steps.json`` holds three short runs' step records and final
weights (``tests/data/engine_v1/make_steps.py``), ``run/`` a whole run directory of
``zo train --config run.yaml`` (4 steps), and ``after_6_steps.json`` the hash of that run's
trainable tensors after 6 uninterrupted steps.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from estimators import ZOSGD, StepRecord
from estimators.zo_adam import ZOAdam
from tests.test_engine import TiedLM
from zo.cli import main
from zo.engine import EngineConfig
from zo.engine_v1 import EngineV1

DATA = Path(__file__).resolve().parent / "data" / "engine_v1"
STEPS = json.loads((DATA / "steps.json").read_text())
ESTIMATORS = {"ZOSGD": ZOSGD, "ZOAdam": ZOAdam}


def bits(tensor: torch.Tensor) -> list[int]:
    integer = torch.int16 if tensor.element_size() == 2 else torch.int32
    return tensor.detach().contiguous().view(-1).view(integer).tolist()


@pytest.mark.parametrize("case", sorted(STEPS))
def test_version_1_step_records_replay_to_the_same_bits(case):
    data = STEPS[case]
    model = TiedLM().to(getattr(torch, data["dtype"]))
    engine = EngineConfig(chunk_size=data["engine"]["chunk_size"], generator="torch-chunks-v1")
    optimizer = ESTIMATORS[data["estimator"]](model.parameters(), engine=engine, **data["kwargs"])
    assert isinstance(optimizer.engine, EngineV1)
    for record in data["records"]:
        optimizer.apply_record(StepRecord.from_dict(record))
    for name, param in model.named_parameters():
        assert bits(param) == data["weights"][name], name


def test_a_version_1_run_directory_replays_bit_for_bit(tmp_path, capsys):
    assert main(["replay", str(DATA / "run"), "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["bit_identical_to_checkpoint"]


def test_a_version_1_run_resumes_with_version_1_directions(tmp_path):
    """Resumed for two more steps, it ends where version 1 itself got in six."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "run", run)
    config = str(DATA / "run" / "config.yaml")
    overrides = [f"train.out={run}", "train.steps=6", "resume=true", "train.progress=false"]
    assert main(["train", "--config", config, *overrides]) == 0
    trained = load_file(str(run / "checkpoint" / "trainable.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(trained):
        digest.update(name.encode())
        digest.update(trained[name].contiguous().view(-1).numpy().tobytes())
    expected = json.loads((DATA / "after_6_steps.json").read_text())
    assert digest.hexdigest() == expected["trainable_sha256"]


@pytest.mark.parametrize(
    "header, message",
    [
        ({"engine_version": "3"}, "engine version '3'"),
        ({"engine_version": "2", "generator": "mt19937-v9"}, "generator 'mt19937-v9'"),
        ({"engine_version": "2"}, "names no direction generator"),
    ],
)
def test_a_run_of_an_unknown_engine_or_generator_is_refused_not_redrawn(
    tmp_path, capsys, header, message
):
    """Resume and replay both refuse it (exit 2, naming the trajectory and the fix) before
    anything is written, rather than drawing other directions than the run's."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "run", run)  # trajectory format 1: its header carries no checksum
    trajectory = run / "trajectory.jsonl"
    lines = trajectory.read_text().splitlines(keepends=True)
    lines[0] = json.dumps({**json.loads(lines[0]), **header}) + "\n"
    trajectory.write_text("".join(lines))
    before = _files(run)
    config = str(DATA / "run" / "config.yaml")
    overrides = [f"train.out={run}", "train.steps=6", "resume=true", "train.progress=false"]
    assert main(["train", "--config", config, *overrides]) == 2
    error = capsys.readouterr().err
    assert (
        f"{trajectory} line 1" in error and message in error and "use the zo that wrote it" in error
    )
    assert main(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 2
    assert message in capsys.readouterr().err
    assert _files(run) == before


def _files(run: Path) -> dict[Path, bytes]:
    """Every file of a run but the lock file (which holds the last owner's pid)."""
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
