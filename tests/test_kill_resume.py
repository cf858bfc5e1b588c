"""`kill -9` at any point, then `resume=true`: the run ends bit-identical to an uninterrupted one.

For every lr schedule, ZO-SGD and ZO-Adam, full, LoRA and mask trainable sets, one process
and two data-parallel ones (torchrun, gloo). The default suite keeps one representative
kill per kind; `-m slow` kills each of them many times at seeded random points.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.test_cli import SMOKE, assert_same_tensors, step_records, trained, zo

ROOT = Path(__file__).resolve().parent.parent
FAST_STEPS, SLOW_STEPS = 12, 30


def run_settings(steps: int) -> list[str]:
    return [
        f"train.steps={steps}",
        "train.save_every=3",
        "train.log_every=3",
        "train.eval_before=false",
        "train.progress=false",
        "task.eval_limit=4",
    ]


ESTIMATORS = {
    "zo_sgd": ["estimator.name=zo_sgd"],
    "zo_adam": ["estimator.name=zo_adam", "estimator.lr=1.0e-3"],
}


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mask") / "random.safetensors"
    args = ["mask", "--model", "tiny-llama", "--out", str(out), "--density", "0.005"]
    assert zo(*args, "--selection", "random") == 0
    return out


def trainables(mask: Path) -> dict[str, list[str]]:
    return {
        "full": [],
        "lora": ["trainable.kind=lora", "trainable.lora_r=2"],
        "mask": [f"trainable=mask:{mask}"],
    }


def _records(out: Path) -> int:
    """Complete step lines in the trajectory (a line being written is not counted)."""
    try:
        lines = (out / "trajectory.jsonl").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    return sum(line.endswith("\n") and '"type": "step"' in line for line in lines)


def _launch(command: list[str]) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts each worker in its own session, so
    a process-group kill would leave them running)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def kill_9(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started, at once: a crashed machine."""
    for pid in [*_descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def train_command(out: Path, overrides: list[str], processes: int) -> list[str]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    return [*launcher, "-m", "zo.cli", "train", "--config", SMOKE, f"train.out={out}", *overrides]


def kill_at(
    out: Path, overrides: list[str], points: list[int], processes: int = 1, jitter: float = 0.0
) -> int:
    """Train into ``out``, SIGKILL the run once its trajectory holds ``points[i]`` steps (and
    up to ``jitter`` seconds more, to land inside a step or a checkpoint write), resume, and
    so on for every point; then resume once more to the end. Returns how many kills hit a
    live run (a run that had already finished was not killed)."""
    jitters, kills = random.Random(len(points)), 0
    for position, point in enumerate(points):
        resume = ["resume=true"] if position else []
        process = _launch(train_command(out, [*overrides, *resume], processes))
        deadline = time.monotonic() + 120
        while _records(out) < point and process.poll() is None:
            assert time.monotonic() < deadline, f"no step {point} within 120 s"
            time.sleep(0.01)
        time.sleep(jitters.uniform(0, jitter))
        if process.poll() is None:
            kill_9(process)
            kills += 1
        process.wait()
    run_to_end(out, [*overrides, "resume=true"] if points else overrides, processes)
    return kills


def run_to_end(out: Path, overrides: list[str], processes: int) -> None:
    final = subprocess.run(
        train_command(out, overrides, processes),
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert final.returncode == 0, final.stderr[-3000:]


def assert_resumed_equals_whole(killed: Path, whole: Path) -> None:
    assert_same_tensors(trained(killed), trained(whole))
    assert step_records(killed) == step_records(whole)


def whole_run(out: Path, overrides: list[str], processes: int = 1) -> Path:
    if processes == 1:
        assert zo("train", "--config", SMOKE, f"train.out={out}", *overrides) == 0
    else:
        run_to_end(out, overrides, processes)
    return out


# ------------------------------------------------------------------ one kill per kind


@pytest.mark.parametrize(
    ("schedule", "estimator", "trainable"),
    [
        ("linear", "zo_adam", "full"),
        ("linear", "zo_sgd", "lora"),
        ("constant", "zo_adam", "mask"),
    ],
)
def test_a_killed_run_resumes_bit_identically(tmp_path, mask_file, schedule, estimator, trainable):
    overrides = [
        *run_settings(FAST_STEPS),
        f"train.lr_schedule={schedule}",
        *ESTIMATORS[estimator],
        *trainables(mask_file)[trainable],
    ]
    whole = whole_run(tmp_path / "whole", overrides)
    assert kill_at(tmp_path / "killed", overrides, [FAST_STEPS // 2 + 1]) == 1
    assert_resumed_equals_whole(tmp_path / "killed", whole)


def test_a_killed_data_parallel_run_resumes_bit_identically(tmp_path):
    overrides = [*run_settings(FAST_STEPS), "train.lr_schedule=linear", *ESTIMATORS["zo_sgd"]]
    whole = whole_run(tmp_path / "whole", overrides, processes=2)
    assert kill_at(tmp_path / "killed", overrides, [FAST_STEPS // 2 + 1], processes=2) == 1
    assert_resumed_equals_whole(tmp_path / "killed", whole)


# ------------------------------------------------------------------ many kills (slow)


def kill_points(count: int, *seed: str) -> list[int]:
    """``count`` increasing step counts in [1, SLOW_STEPS), seeded: where each kill lands."""
    generator = random.Random(zlib.crc32(" ".join(seed).encode()))
    return sorted(generator.sample(range(1, SLOW_STEPS), count))


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["full", "lora", "mask"])
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_every_schedule_survives_repeated_kills(
    tmp_path, mask_file, schedule, estimator, trainable
):
    overrides = [
        *run_settings(SLOW_STEPS),
        f"train.lr_schedule={schedule}",
        *ESTIMATORS[estimator],
        *trainables(mask_file)[trainable],
    ]
    whole = whole_run(tmp_path / "whole", overrides)
    points = kill_points(5, schedule, estimator, trainable)
    assert kill_at(tmp_path / "killed", overrides, points, jitter=0.05) >= len(points) // 2
    assert_resumed_equals_whole(tmp_path / "killed", whole)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_twenty_kills(tmp_path, estimator):
    overrides = [*run_settings(SLOW_STEPS), "train.lr_schedule=linear", *ESTIMATORS[estimator]]
    whole = whole_run(tmp_path / "whole", overrides)
    points = kill_points(20, estimator)
    assert kill_at(tmp_path / "killed", overrides, points, jitter=0.05) >= len(points) // 2
    assert_resumed_equals_whole(tmp_path / "killed", whole)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_a_data_parallel_run_survives_repeated_kills(tmp_path, schedule):
    overrides = [*run_settings(SLOW_STEPS), f"train.lr_schedule={schedule}", *ESTIMATORS["zo_sgd"]]
    whole = whole_run(tmp_path / "whole", overrides, processes=2)
    points = kill_points(4, schedule)
    assert (
        kill_at(tmp_path / "killed", overrides, points, processes=2, jitter=0.05)
        >= len(points) // 2
    )
    assert_resumed_equals_whole(tmp_path / "killed", whole)
