"""Run directories that survive bad state: one owner at a time, damage refused by name
(never rewritten), checksummed checkpoints, k kept checkpoints, atomic creation, and runs
written before any of that (trajectory format 1) still replaying and resuming."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import (
    QUIET,
    ROOT,
    SMOKE,
    assert_same_tensors,
    step_records,
    trained,
    zo,
)

FORMAT_1_RUN = ROOT / "tests" / "data" / "run_format1"
"""12-step tiny run written by zo before trajectory format 2 (stopped at step 8)."""
FORMAT_1_SETTINGS = [
    "trainable=names:*norm*",
    "estimator.name=zo_adam",
    "estimator.lr=1.0e-2",
    "train.save_every=4",
    "train.eval_before=false",
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke config's 12 steps, a checkpoint every 4: the run every test damages a copy of."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    assert zo("train", "--config", SMOKE, f"train.out={out}", *QUIET) == 0
    return out


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def files_of(run: Path) -> dict[str, bytes]:
    """Every file of a run but the lock file (which holds the last owner's pid)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def resume(run: Path, *extra: str) -> int:
    return zo("train", "--config", SMOKE, f"train.out={run}", "resume=true", *extra, *QUIET)


# ---------------------------------------------------------------------- one owner


def test_a_live_run_belongs_to_one_process_until_it_dies(tmp_path, capsys):
    run = tmp_path / "live"
    settings = ["train.save_every=3", "train.eval_before=false", *QUIET]
    command = [sys.executable, "-m", "zo.cli", "train", "--config", SMOKE, f"train.out={run}"]
    process = subprocess.Popen(
        [*command, "train.steps=100000", *settings],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint" / "state.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        for new_or_resumed in (["resume=true"], []):  # both would write into the live run
            args = ["train", "--config", SMOKE, f"train.out={run}", "train.steps=3"]
            assert zo(*args, *new_or_resumed, *QUIET) == 2
            assert f"in use by process {process.pid}" in capsys.readouterr().err
        # readers take no lock: they read one consistent checkpoint beside the live writer
        assert zo("replay", str(run), "--out", str(tmp_path / "replayed")) == 0
        replayed = last_json(capsys.readouterr().out)
        assert replayed["bit_identical_to_checkpoint"] and replayed["checkpoint_step"] % 3 == 0
        assert zo("eval", "--config", SMOKE, "--checkpoint", str(run / "checkpoint")) == 0
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # the lock went with the killed process: resume works at once and stays replayable
    steps = json.loads((run / "checkpoint" / "state.json").read_text())["step"] + 2
    assert zo(*command[3:], f"train.steps={steps}", "resume=true", *settings) == 0
    assert [r["step"] for r in step_records(run)] == list(range(steps))
    assert zo("replay", str(run), "--out", str(tmp_path / "after")) == 0
    assert last_json(capsys.readouterr().out)["bit_identical_to_checkpoint"]


# ---------------------------------------------------------------------- damaged trajectory


def _edit_lines(run: Path, edit) -> None:
    path = run / "trajectory.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    edit(lines)
    path.write_text("".join(lines))


def _garble(lines, n):
    lines[n - 1] = '{"type": "step", "st\x00ep": 5,,\n'


def _change_scalar(lines):
    record = json.loads(lines[6])
    record["scalars"][0] *= 2  # still valid JSON: only the checksum shows it
    lines[6] = json.dumps(record) + "\n"


TRAJECTORY_DAMAGE = {
    "garbled line": (lambda lines: _garble(lines, 7), 7),
    "garbled header": (lambda lines: _garble(lines, 1), 1),
    "missing header": (lambda lines: lines.pop(0), 1),
    "gap": (lambda lines: lines.pop(6), 7),
    "duplicate": (lambda lines: lines.insert(7, lines[6]), 8),
    "changed value": (_change_scalar, 7),
}


@pytest.mark.parametrize("damage", TRAJECTORY_DAMAGE)
def test_a_damaged_trajectory_is_refused_by_line_and_left_as_it_is(
    damage, smoke_run, tmp_path, capsys
):
    edit, line = TRAJECTORY_DAMAGE[damage]
    run = copy_run(smoke_run, tmp_path / "run")
    _edit_lines(run, edit)
    before = files_of(run)
    assert resume(run) == 2
    assert f"trajectory.jsonl line {line}:" in capsys.readouterr().err
    assert files_of(run) == before  # resume wrote nothing
    assert zo("replay", str(run), "--out", str(tmp_path / "replayed")) == 2
    assert f"trajectory.jsonl line {line}:" in capsys.readouterr().err
    assert not (tmp_path / "replayed").exists()


def test_a_garbled_metrics_line_is_refused_too(smoke_run, tmp_path, capsys):
    run = copy_run(smoke_run, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([lines[0], "{garbled\n", *lines[2:]]))
    before = files_of(run)
    assert resume(run) == 2
    assert "metrics.jsonl line 2:" in capsys.readouterr().err
    assert files_of(run) == before


def test_repair_continues_from_the_intact_part_and_keeps_the_damaged_file(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "run")
    _edit_lines(run, lambda lines: _garble(lines, 7))
    damaged = (run / "trajectory.jsonl").read_bytes()
    assert resume(run, "train.repair=true") == 0
    (backup,) = run.glob("trajectory.jsonl.damaged-*")
    assert backup.read_bytes() == damaged
    assert (run / "checkpoint.damaged-12").is_dir()  # past the intact part: set aside
    assert step_records(run) == step_records(smoke_run)
    assert_same_tensors(trained(run), trained(smoke_run))
    assert zo("replay", str(run), "--out", str(tmp_path / "replayed")) == 0


def test_resume_and_replay_refuse_a_header_this_setup_does_not_match(
    smoke_run, tmp_path, capsys, monkeypatch
):
    run = copy_run(smoke_run, tmp_path / "run")
    monkeypatch.setattr("zo.train.engine_version", lambda generator: "another-engine")
    assert resume(run) == 2
    assert "line 1: engine_version is" in capsys.readouterr().err
    assert zo("replay", str(run), "--out", str(tmp_path / "replayed")) == 2
    assert "engine_version" in capsys.readouterr().err


def test_replay_writes_nothing_into_the_run(smoke_run, capsys):
    before = files_of(smoke_run)
    for out in (smoke_run, smoke_run / "checkpoint"):
        assert zo("replay", str(smoke_run), "--out", str(out)) == 2
        assert "the run's own folder or checkpoint" in capsys.readouterr().err
    assert files_of(smoke_run) == before


# ---------------------------------------------------------------------- damaged files


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x40  # inside the last tensor's bytes: the file stays a valid safetensors
    path.write_bytes(bytes(raw))


TRAINABLE, OPTIMIZER = "checkpoint/trainable.safetensors", "checkpoint/optimizer.pt"
# damage -> (file, what it does to it, exit code of resume, replay, eval --checkpoint)
FILE_DAMAGE = {
    "truncated tensors": (TRAINABLE, lambda p: _truncate(p, 1000), 2, 2, 2),
    "empty tensors": (TRAINABLE, lambda p: _truncate(p, 0), 2, 2, 2),
    "garbled safetensors header": (TRAINABLE, lambda p: _overwrite(p, 8, b"X" * 20), 2, 2, 2),
    "flipped tensor byte": (TRAINABLE, _flip, 2, 2, 2),
    "truncated optimizer state": (OPTIMIZER, lambda p: _truncate(p, 100), 2, 0, 0),
    "bad state.json": ("checkpoint/state.json", lambda p: p.write_text('{"step": 1'), 2, 2, 2),
    "binary config.yaml": ("config.yaml", lambda p: p.write_bytes(bytes(range(256))), 2, 2, 0),
}


@pytest.mark.parametrize("damage", FILE_DAMAGE)
def test_damaged_files_are_named_and_nothing_is_changed(damage, smoke_run, tmp_path, capsys):
    name, harm, *expected = FILE_DAMAGE[damage]
    run = copy_run(smoke_run, tmp_path / "run")
    harm(run / name)
    before = files_of(run)
    commands = [
        ["train", "--config", SMOKE, f"train.out={run}", "resume=true", *QUIET],
        ["replay", str(run), "--out", str(tmp_path / "replayed")],
        ["eval", "--config", SMOKE, "--checkpoint", str(run / "checkpoint")],
    ]
    for command, code in zip(commands, expected, strict=True):
        assert zo(*command) == code, command[0]  # an exception would fail here: no traceback
        if code == 2:
            assert str(run / name) in capsys.readouterr().err, command[0]
        assert files_of(run) == before, command[0]
    # replay reads no optimizer state: a run of a stateless estimator replays without it


# ---------------------------------------------------------------------- kept checkpoints


def test_k_checkpoints_are_kept_and_resume_skips_a_damaged_newest(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    keep = "train.keep_checkpoints=2"
    assert zo("train", "--config", SMOKE, f"train.out={run}", keep, *QUIET) == 0
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint", "checkpoint-8"]
    assert json.loads((run / "checkpoint-8" / "state.json").read_text())["step"] == 8
    _flip(run / TRAINABLE)
    capsys.readouterr()
    assert zo("replay", str(run), "--out", str(tmp_path / "replayed")) == 0
    out = capsys.readouterr().out
    assert "skipped a damaged checkpoint" in out and str(run / TRAINABLE) in out
    assert last_json(out)["checkpoint_step"] == 8
    assert last_json(out)["bit_identical_to_checkpoint"]
    assert resume(run, keep) == 0
    assert str(run / TRAINABLE) in capsys.readouterr().out  # said which it skipped, and why
    names = sorted(p.name for p in run.glob("checkpoint*"))
    assert names == ["checkpoint", "checkpoint-8", "checkpoint.damaged-12"]
    assert_same_tensors(trained(run), trained(smoke_run))
    assert step_records(run) == step_records(smoke_run)


# ---------------------------------------------------------------------- creation


KILLED_AT_THE_HEADER = """
import importlib.util, os, signal, sys
import zo.trajectory
where = "zo.run_directory" if importlib.util.find_spec("zo.run_directory") else "zo.trajectory"
module = importlib.import_module(where)
write = module.atomic_write_text
def killed_at_the_header(path, text):
    if path.name == "trajectory.jsonl":
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, text)
module.atomic_write_text = killed_at_the_header
from zo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_while_being_created_is_started_over(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"train.out={run}", *QUIET]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THE_HEADER, *args], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    assert (run / "config.yaml").exists() and not (run / "trajectory.jsonl").exists()
    assert zo(*args) == 2
    assert "killed while being created" in capsys.readouterr().err
    assert zo(*args, "resume=true") == 0
    assert "starting it over from step 0" in capsys.readouterr().out
    assert_same_tensors(trained(run), trained(smoke_run))
    assert zo("replay", str(run), "--out", str(tmp_path / "replayed")) == 0
    assert last_json(capsys.readouterr().out)["bit_identical_to_checkpoint"]


# ---------------------------------------------------------------------- engine settings on resume


def test_a_resume_may_change_the_engines_speed_settings_and_ends_at_the_same_weights(
    smoke_run, tmp_path, capsys
):
    """Threads and buckets change no value (another machine): said, and taken. The
    output-side limits can change an accelerator's rounding: the run's own are kept, said.
    The resumed run ends where the uninterrupted one did."""
    run = tmp_path / "run"
    assert zo("train", "--config", SMOKE, f"train.out={run}", "train.steps=8", *QUIET) == 0
    capsys.readouterr()
    speed = ["engine.threads=1", "engine.bucket_size=4096", "engine.offload_max_rows=0"]
    assert resume(run, *speed) == 0
    out = capsys.readouterr().out
    for setting in ("engine.threads is 1 here", "engine.bucket_size is 4096 here"):
        assert setting in out and "speed only" in out
    assert "keeping the run's engine.offload_max_rows=-1 (not 0)" in out
    assert_same_tensors(trained(run), trained(smoke_run))
    assert step_records(run) == step_records(smoke_run)


def test_a_resume_keeps_the_runs_output_side_limits_and_takes_the_new_threads(tmp_path):
    """A run recorded before the default of offload_max_rows changed (64) keeps its 64."""
    from dataclasses import replace

    from zo.run_config import check_resumable, load_run_config
    from zo.run_directory import RunDirectory

    run = RunDirectory(copy_run(FORMAT_1_RUN, tmp_path / "old"))
    saved = load_run_config(run)
    assert saved.engine.offload_max_rows == 64
    asked = replace(saved, engine=replace(saved.engine, offload_max_rows=-1, threads=1))
    said = []
    resumed = check_resumable(run, asked, said.append)
    assert resumed.engine.offload_max_rows == 64 and resumed.engine.threads == 1
    assert len(said) == 2


@pytest.mark.parametrize(
    "setting", ["engine.distribution=rademacher", "engine.generator=philox", "engine.chunk_size=64"]
)
def test_a_resume_refuses_an_engine_setting_that_decides_the_directions(
    smoke_run, tmp_path, capsys, setting
):
    run = copy_run(smoke_run, tmp_path / "run")
    before = files_of(run)
    assert resume(run, setting, "train.steps=16") == 2
    key = setting.split("=")[0]
    err = capsys.readouterr().err
    assert f"resume: {key} is" in err and "it decides the run's directions" in err
    assert files_of(run) == before


# ---------------------------------------------------------------------- trajectory format 1


def test_runs_of_trajectory_format_1_replay_and_resume(tmp_path, capsys):
    run = copy_run(FORMAT_1_RUN, tmp_path / "old")
    assert zo("replay", str(run), "--out", str(tmp_path / "replayed")) == 0
    out = capsys.readouterr().out
    assert "before checkpoints carried checksums" in out
    assert last_json(out)["checkpoint_step"] == 8 and last_json(out)["bit_identical_to_checkpoint"]
    assert resume(run, *FORMAT_1_SETTINGS, "train.steps=12") == 0
    lines = [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]
    assert lines[0]["format"] == 1 and not any("check" in line for line in lines)  # stays 1
    assert [line["step"] for line in lines[1:]] == list(range(12))
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 12 and set(state["files"]) == {"trainable.safetensors", "optimizer.pt"}
    assert zo("replay", str(run), "--out", str(tmp_path / "again")) == 0
    assert last_json(capsys.readouterr().out)["bit_identical_to_checkpoint"]
    _edit_lines(run, lambda lines: lines.pop(4))  # a gap is damage in format 1 as well
    assert zo("replay", str(run), "--out", str(tmp_path / "gap")) == 2
    assert "trajectory.jsonl line 5: step 4 where step 3 belongs" in capsys.readouterr().err


# ---------------------------------------------------------------------- steps on resume


def test_a_resume_cannot_shorten_a_run(smoke_run, tmp_path, capsys):
    run = copy_run(smoke_run, tmp_path / "run")
    before = files_of(run)
    assert resume(run, "train.steps=8") == 2  # it printed a negative steps/s
    err = capsys.readouterr().err
    assert "train.steps is 8" in err and "at step 12 already" in err
    assert files_of(run) == before


def test_a_resume_of_a_finished_run_trains_nothing_and_changes_nothing(smoke_run, tmp_path, capsys):
    run = copy_run(smoke_run, tmp_path / "run")
    before = files_of(run)
    assert resume(run) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "(no steps run)" in out
    assert files_of(run) == before  # summary.json and loss.png of the run that trained
