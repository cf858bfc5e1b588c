"""Sharded ZO-SGD on FSDP2 (gloo, CPU): equal to data parallelism bit for bit, replayable in
one process, ~1/N of the blocks per rank; the sharded plans; and the refusals of what
train.parallel=fsdp does not do (the other estimators: tests/test_sharded_estimators.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from estimators.base import StepRecord
from estimators.zo_sgd import ZOSGD
from tests.test_cli import SMOKE, assert_same_tensors, step_records, trained, zo
from zo.blocks import decoder_blocks
from zo.engine import EngineConfig
from zo.models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "sharded_worker.py")


def torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*command, "--nproc_per_node", str(processes), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


def run_worker(processes: int, out: Path, *names: str) -> tuple[dict, dict]:
    """Run tests/sharded_worker.py for ``names`` (one launch for all); its metadata and
    tensors."""
    result = torchrun(processes, WORKER, str(out), ",".join(names or ["zo_sgd"]))
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(str(out), "pt") as saved:
        metadata = saved.metadata()
        tensors = {key: saved.get_tensor(key) for key in saved.keys()}  # noqa: SIM118
    return metadata, tensors


def expected_local_bytes(processes: int) -> int:
    """Rank 0's bytes: its rows (torch.chunk's split) of every block tensor, the rest whole."""
    model, _ = tiny_model("llama")
    in_blocks = {id(p) for block in decoder_blocks(model) for p in block.parameters()}
    total = 0
    for param in model.parameters():
        rows = -(-param.shape[0] // processes) if id(param) in in_blocks else param.shape[0]
        total += rows * param[0].numel() * param.element_size()
    return total


def check_sharded_run(processes: int, tmp_path: Path) -> None:
    metadata, tensors = run_worker(processes, tmp_path / "out.safetensors", "zo_sgd")
    names = [key.removeprefix("base/") for key in tensors if key.startswith("base/")]
    records = json.loads(metadata["zo_sgd/sharded_records"])
    # the sharded run took the data-parallel run's steps and ends at its weights, bit for bit
    assert records == json.loads(metadata["zo_sgd/plain_records"])
    for name in names:
        sharded = tensors[f"zo_sgd/sharded/{name}"]
        assert torch.equal(sharded, tensors[f"zo_sgd/plain/{name}"]), name
        assert not torch.equal(sharded, tensors[f"base/{name}"]), name
    # one process replays the sharded run's trajectory to the same weights
    model, _ = tiny_model("llama")
    model.load_state_dict({name: tensors[f"base/{name}"] for name in names}, strict=False)
    replay = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=3, engine=EngineConfig(threads=1))
    for record in records:
        replay.apply_record(StepRecord.from_dict(record))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), tensors[f"zo_sgd/sharded/{name}"]), name
    # each rank holds its rows of the blocks, and the embeddings / norm / head whole
    assert int(metadata["zo_sgd/local_bytes"]) == expected_local_bytes(processes)
    assert int(metadata["zo_sgd/local_bytes"]) < int(metadata["full_bytes"])


def test_two_sharded_ranks_end_at_the_data_parallel_weights_and_replay(tmp_path):
    check_sharded_run(2, tmp_path)


@pytest.mark.slow
def test_four_sharded_ranks_end_at_the_data_parallel_weights_and_replay(tmp_path):
    check_sharded_run(4, tmp_path)


@pytest.mark.slow
def test_zo_train_parallel_fsdp_equals_data_parallel_and_replays(tmp_path):
    steps = ["train.steps=6", "train.save_every=3", "train.progress=false"]
    runs = {name: tmp_path / name for name in ("fsdp", "data")}
    for name, out in runs.items():
        config = ["train", "--config", SMOKE, f"train.out={out}", f"train.parallel={name}"]
        result = torchrun(2, "-m", "zo.cli", *config, *steps)
        assert result.returncode == 0, result.stderr[-3000:]
    assert step_records(runs["fsdp"]) == step_records(runs["data"])
    assert_same_tensors(trained(runs["fsdp"]), trained(runs["data"]))
    assert zo("replay", str(runs["fsdp"]), "--out", str(tmp_path / "replayed")) == 0
    replayed = load_file(str(tmp_path / "replayed" / "trainable.safetensors"))
    assert_same_tensors(replayed, trained(runs["fsdp"]))


# ------------------------------------------------------------------ refusals, before any model
def refused(tmp_path, capsys, monkeypatch, world: int, *overrides: str) -> str:
    if world > 1:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"train.out={out}", "train.parallel=fsdp", *overrides]
    assert zo(*args) == 2
    assert not out.exists()  # refused before anything was written
    return capsys.readouterr().err


def test_fsdp_without_a_launcher_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "launch with `torchrun" in refused(tmp_path, capsys, monkeypatch, 1)


def test_an_estimator_that_cannot_shard_is_refused(tmp_path, capsys, monkeypatch):
    err = refused(tmp_path, capsys, monkeypatch, 2, "estimator.name=block_zo")
    assert "'block_zo' cannot run sharded" in err


def test_a_quantized_base_is_refused_sharded(tmp_path, capsys, monkeypatch):
    err = refused(tmp_path, capsys, monkeypatch, 2, "model.quant=nf4", "trainable=lora")
    assert "model.quant=nf4 cannot run sharded" in err


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, capsys, monkeypatch):
    err = refused(tmp_path, capsys, monkeypatch, 2, "train.batch_size=3")
    assert "does not split over 2 processes" in err


@pytest.mark.slow
def test_kill_9_of_one_sharded_rank_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = ["train.steps=120", "train.save_every=5", "train.progress=false"]
    config = ["-m", "zo.cli", "train", "--config", SMOKE, "train.parallel=fsdp", *steps]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher = subprocess.Popen(
        [*command, "--nproc_per_node", "2", *config, f"train.out={killed}"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not (state.exists() and json.loads(state.read_text())["step"] >= 10):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    ranks = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    os.kill(int(ranks[-1]), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert json.loads(state.read_text())["step"] < 120  # it died mid-run
    resumed = torchrun(2, *config, f"train.out={killed}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = torchrun(2, *config, f"train.out={whole}")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert step_records(killed) == step_records(whole)
    assert_same_tensors(trained(killed), trained(whole))


@pytest.mark.parametrize("processes", [2, 4])
def test_the_sharded_plan_predicts_each_ranks_weight_bytes(processes):
    from zo.memory.parallel import plan_offloaded, plan_sharded
    from zo.memory.shapes import shape_from_hf_config
    from zo.memory.step import PlanRequest

    model, _ = tiny_model("llama")
    shape = shape_from_hf_config(model.config.to_dict())
    import estimators

    zo_sgd = estimators.get_estimator("zo_sgd").planned()
    request = PlanRequest(shape=shape, estimator=zo_sgd, device="cpu", batch=2, seq_len=16)
    assert plan_sharded(request, processes).resident == expected_local_bytes(processes)
    blocks = sum(p.numel() * 4 for block in decoder_blocks(model) for p in block.parameters())
    offloaded = plan_offloaded(request)
    assert offloaded.resident == sum(p.numel() * 4 for p in model.parameters()) - blocks
    assert offloaded.host_bytes >= blocks


def test_the_sharded_plan_shards_optimizer_state_and_refuses_what_fsdp_does_not_run():
    import estimators
    from zo.memory.parallel import plan_sharded
    from zo.memory.shapes import PlanError, shape_from_hf_config
    from zo.memory.step import PlanRequest

    model, _ = tiny_model("llama")
    shape = shape_from_hf_config(model.config.to_dict())

    def request(name: str) -> PlanRequest:
        planned = estimators.get_estimator(name).planned()
        return PlanRequest(shape=shape, estimator=planned, device="cpu", batch=2, seq_len=16)

    weights = sum(p.numel() * 4 for p in model.parameters())
    for ranks in (2, 4):
        plain, adam = (
            plan_sharded(request("zo_sgd"), ranks),
            plan_sharded(request("zo_adam"), ranks),
        )
        # ZO-Adam's two fp32 moments, sharded like the weights (plus one more g_hat chunk)
        moments = adam.device_peak - plain.device_peak
        assert 2 * plain.resident <= moments < 2 * weights
    peaks = [plan_sharded(request("adamw"), ranks).device_peak for ranks in (1, 2, 4)]
    assert peaks[0] > peaks[1] > peaks[2]
    with pytest.raises(PlanError, match="sharded plans cover"):
        plan_sharded(request("block_zo"), 2)


@pytest.mark.parametrize("trainable", ["lora", "mask:0.01"])
def test_a_sharded_lora_or_mask_plan_shards_the_frozen_base_like_full(trainable):
    import dataclasses

    import estimators
    from zo.memory.parallel import plan_sharded
    from zo.memory.shapes import shape_from_hf_config
    from zo.memory.step import PlanRequest

    model, _ = tiny_model("llama")
    shape = shape_from_hf_config(model.config.to_dict())
    zo_adam = estimators.get_estimator("zo_adam").planned()
    full = PlanRequest(shape=shape, estimator=zo_adam, device="cpu", batch=2, seq_len=16)
    small = dataclasses.replace(full, trainable=trainable)
    for ranks in (2, 4):
        # the frozen base is sharded as a full run's weights are; the moments cover only the
        # adapters or deltas, so the peak drops by most of the full run's two moments
        assert plan_sharded(small, ranks).resident == expected_local_bytes(ranks)
        saved = plan_sharded(full, ranks).device_peak - plan_sharded(small, ranks).device_peak
        assert saved > plan_sharded(full, ranks).resident
