"""``accelerate launch`` runs zo's data-parallel and sharded training like torchrun does.

accelerate 1.16 has two launch paths: ``--multi_gpu`` (also ``--use_fsdp``) runs
torchrun underneath, which sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_*`` as
torchrun does (zo picks gloo when the device is a CPU); ``--cpu`` starts one process, or N
under mpirun, without ``WORLD_SIZE`` -- processes that do not know each other, which zo
refuses rather than train N unrelated copies into one run directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.test_cli import ROOT, SMOKE, assert_same_tensors, step_records, trained, zo
from zo.distributed import DataParallel

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))
STEPS = ["train.steps=4", "train.progress=false", "train.eval_before=false"]


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    return subprocess.run(
        [*launcher, "-m", "zo.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    flags += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch([ACCELERATE, "launch", *flags, "--main_process_port", free_port()], *args)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return launch([*command, "--master_port", free_port()], *args)


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed")
@pytest.mark.parametrize("parallel", ["data", "fsdp"])
def test_accelerate_launch_trains_bit_identically_to_torchrun(parallel, tmp_path):
    runs = {name: tmp_path / name for name in ("accelerate", "torchrun")}
    config = ["train", "--config", SMOKE, f"train.parallel={parallel}", *STEPS]
    for name, launcher in (("accelerate", accelerate_launch), ("torchrun", torchrun)):
        result = launcher(*config, f"train.out={runs[name]}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "processes:              2" in result.stdout
    assert step_records(runs["accelerate"]) == step_records(runs["torchrun"])
    assert_same_tensors(trained(runs["accelerate"]), trained(runs["torchrun"]))


def test_accelerates_cpu_launch_of_unconnected_processes_is_refused(tmp_path, monkeypatch, capsys):
    """What ``accelerate launch --cpu --num_processes 2`` leaves each process: MASTER_ADDR,
    ACCELERATE_USE_CPU, no WORLD_SIZE."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    out = tmp_path / "run"
    assert zo("train", "--config", SMOKE, f"train.out={out}", *STEPS) == 2
    assert "accelerate launch --multi_gpu" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("variable", "value", "fix"),
    [
        ("ACCELERATE_USE_FSDP", "true", "train.parallel=fsdp"),
        ("ACCELERATE_USE_DEEPSPEED", "true", "train.parallel=fsdp"),
        ("ACCELERATE_MIXED_PRECISION", "bf16", "train.autocast=bf16"),
    ],
)
def test_accelerate_settings_zo_does_not_read_are_refused(
    variable, value, fix, tmp_path, monkeypatch, capsys
):
    """``accelerate launch --use_fsdp`` (or ``--mixed_precision bf16``) would otherwise train
    unsharded (in full precision) without a word: zo takes these from its own config."""
    monkeypatch.setenv(variable, value)
    out = tmp_path / "run"
    assert zo("train", "--config", SMOKE, f"train.out={out}", *STEPS) == 2
    error = capsys.readouterr().err
    assert variable in error and fix in error
    assert not out.exists()


def test_accelerates_default_settings_are_accepted(monkeypatch):
    for variable, value in (("ACCELERATE_MIXED_PRECISION", "no"), ("ACCELERATE_USE_FSDP", "false")):
        monkeypatch.setenv(variable, value)
    DataParallel.from_environment()
