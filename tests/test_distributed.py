"""Data parallelism: two gloo processes on halves of a batch against one process on all of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import estimators
from estimators.hybrid import Hybrid
from tests.test_cli import SMOKE, assert_same_tensors, step_records, trained, zo
from zo.distributed import DataParallel, DataParallelError

ROOT = Path(__file__).resolve().parent.parent

# Every estimator family, each with its data-parallel hook: scalars (ZO) or gradients.
SETTINGS = {
    "zo_sgd": {"lr": 1e-2, "eps": 1e-3, "queries": 2},
    "zo_adam": {"lr": 1e-2, "eps": 1e-3},
    "forward_grad": {"lr": 1e-2},
    "sgd": {"lr": 1e-1},
    "adamw": {"lr": 1e-2},
    "lomo": {"lr": 1e-1, "clip_grad_norm": 0.5},  # two passes: the global norm is reduced too
    "hybrid": {"lr": 1e-2, "eps": 1e-3, "first_order": ["2.*"]},
}
STEPS = 3


def regression_problem():
    """A seeded two-layer net and 8 examples; its loss is a mean over examples."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    inputs = torch.randn(8, 6, generator=generator)
    targets = torch.randn(8, 1, generator=generator)
    return model, inputs, targets


def train_on(name: str, parallel: DataParallel) -> dict[str, torch.Tensor]:
    """STEPS steps of ``name`` on this rank's shard of the 8 examples; the final weights."""
    model, inputs, targets = regression_problem()
    optimizer = estimators.build_estimator(
        name, list(model.named_parameters()), model=model, seed=3, **SETTINGS[name]
    )
    parallel.attach(optimizer)
    rows = parallel.shard(range(8))
    x, y = inputs[rows], targets[rows]
    for _ in range(STEPS):
        optimizer.step(lambda: nn.functional.mse_loss(model(x), y))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _rank_main(rank: int, world_size: int, init_file: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallel = DataParallel.from_environment()
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results = {name: train_on(name, parallel) for name in SETTINGS}
    finally:
        torch.distributed.destroy_process_group()
    torch.save(results, f"{out}.{rank}")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    out = str(folder / "weights")
    mp.spawn(_rank_main, args=(2, str(folder / "rendezvous"), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_two_processes_on_halves_equal_one_process_on_the_batch(two_process_results, name):
    rank0, rank1 = (results[name] for results in two_process_results)
    assert_same_tensors(rank0, rank1)  # every rank applied the very same update
    one_process = train_on(name, DataParallel())
    start = dict(regression_problem()[0].named_parameters())
    for key, weights in rank0.items():
        assert not torch.equal(weights, start[key].detach())  # it trained
        # equal up to float rounding of the loss sums (ZO divides it by 2 eps)
        torch.testing.assert_close(weights, one_process[key], rtol=1e-4, atol=3e-5)


# ------------------------------------------------------------------ without processes
def test_environment_sets_rank_and_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert DataParallel.from_environment() == DataParallel(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    parallel = DataParallel.from_environment()
    assert (parallel.rank, parallel.world_size, parallel.local_rank) == (3, 4, 1)
    assert parallel.enabled and not parallel.is_main
    assert parallel.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert parallel.device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DataParallelError, match="outside WORLD_SIZE 4"):
        DataParallel.from_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DataParallelError, match="must be integers"):
        DataParallel.from_environment()


def test_shards_are_equal_contiguous_slices_and_the_batch_must_split():
    batch = [5, 1, 4, 2, 8, 7]
    shards = [DataParallel(rank, 3).shard(batch) for rank in range(3)]
    assert shards == [[5, 1], [4, 2], [8, 7]]
    DataParallel(0, 3).check_batch(6)
    with pytest.raises(DataParallelError, match="multiple of 4"):
        DataParallel(0, 4).check_batch(6)


def test_one_process_attaches_nothing():
    model, _, _ = regression_problem()
    optimizer = estimators.build_estimator("zo_sgd", model.parameters())
    DataParallel().attach(optimizer)
    assert optimizer.reducer is None
    assert DataParallel().mean([1.0, 2.0]) == [1.0, 2.0]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_attach_hands_the_estimator_the_reducer(name):
    """One declared method of the contract, no probing; hybrid's two parts both get it."""
    model, _, _ = regression_problem()
    optimizer = estimators.build_estimator(name, list(model.named_parameters()), **SETTINGS[name])
    parallel = DataParallel(0, 2)  # enabled (no collective runs here)
    parallel.attach(optimizer)
    parts = [optimizer.zeroth, optimizer.first] if isinstance(optimizer, Hybrid) else [optimizer]
    assert all(part.reducer is parallel for part in parts)


# ------------------------------------------------------------------ torchrun end to end
def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, "-m", "zo.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )


def test_torchrun_trains_like_one_process_and_replays_from_rank_0s_trajectory(tmp_path):
    steps = ["train.steps=6", "train.save_every=3", "train.progress=false"]
    parallel_run, one_run = tmp_path / "parallel", tmp_path / "one"
    result = torchrun("train", "--config", SMOKE, f"train.out={parallel_run}", *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final dev accuracy") == 1  # rank 0 alone reports
    assert zo("train", "--config", SMOKE, f"train.out={one_run}", *steps) == 0
    summary = json.loads((parallel_run / "summary.json").read_text())
    assert summary["processes"] == 2
    parallel_steps, one_steps = step_records(parallel_run), step_records(one_run)
    assert [r["seeds"] for r in parallel_steps] == [r["seeds"] for r in one_steps]
    for a, b in zip(parallel_steps, one_steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["scalars"] == pytest.approx(b["scalars"], rel=1e-2, abs=1e-3)
    # the trajectory holds the all-reduced scalars: one process replays the parallel run
    assert zo("replay", str(parallel_run), "--out", str(tmp_path / "replayed")) == 0
    replayed = load_file(str(tmp_path / "replayed" / "trainable.safetensors"))
    assert_same_tensors(replayed, trained(parallel_run))


def test_a_batch_that_does_not_split_over_the_processes_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    assert zo("train", "--config", SMOKE, f"train.out={out}", "train.batch_size=3") == 2
    assert "does not split over 2 processes" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_world_size_without_a_launcher_is_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    out = tmp_path / "run"
    assert zo("train", "--config", SMOKE, f"train.out={out}") == 2
    assert "launch with `torchrun" in capsys.readouterr().err
    assert not out.exists()
