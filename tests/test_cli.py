"""The `zo` command end to end on the tiny smoke config: train, replay, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zo.commands import main
from zo.commands.validate import shipped_configs

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")
QUIET = ["train.progress=false"]


def zo(*args: str) -> int:
    return main(list(args))


def trained(path: Path) -> dict:
    return load_file(str(path / "checkpoint" / "trainable.safetensors"))


def step_records(path: Path) -> list[dict]:
    lines = (path / "trajectory.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"type": "step"' in line]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "smoke"
    assert zo("train", "--config", SMOKE, f"train.out={out}", *QUIET) == 0
    return out


def test_train_writes_the_whole_run_directory(smoke_run, capsys):
    for name in ("config.yaml", "metrics.jsonl", "trajectory.jsonl", "summary.json", "loss.png"):
        assert (smoke_run / name).is_file(), name
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["steps"] == 12 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["zero_shot_accuracy"] is not None and summary["peak_memory_bytes"] > 0
    header = json.loads((smoke_run / "trajectory.jsonl").read_text().splitlines()[0])
    assert header["type"] == "header" and header["model_hash"] and header["trainable"]
    assert header["torch_version"] and header["engine_version"]
    assert [r["step"] for r in step_records(smoke_run)] == list(range(12))
    metrics = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 2, 4, 6, 8, 10, 12]  # as the progress bar


def test_replay_rebuilds_the_checkpoint_bit_for_bit(smoke_run, tmp_path, capsys):
    assert zo("replay", str(smoke_run), "--out", str(tmp_path)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])[
        "bit_identical_to_checkpoint"
    ]
    replayed = load_file(str(tmp_path / "trainable.safetensors"))
    assert_same_tensors(replayed, trained(smoke_run))


def test_resume_after_a_crash_mid_step_is_bit_identical(smoke_run, tmp_path):
    # A run that stopped after its step-8 checkpoint, then logged two more steps and half a
    # line before dying, with a checkpoint half-written: what `kill -9` can leave behind.
    out = tmp_path / "crashed"
    assert zo("train", "--config", SMOKE, f"train.out={out}", "train.steps=8", *QUIET) == 0
    records = step_records(smoke_run)
    with open(out / "trajectory.jsonl", "a") as handle:
        for record in records[8:10]:
            handle.write(json.dumps(record) + "\n")
        handle.write('{"type": "step", "step": 10, "se')
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "trainable.safetensors").write_bytes(b"partial")
    assert zo("train", "--config", SMOKE, f"train.out={out}", "resume=true", *QUIET) == 0
    assert_same_tensors(trained(out), trained(smoke_run))
    assert step_records(out) == records


def test_eval_loads_a_checkpoint(smoke_run, capsys):
    assert zo("eval", "--config", SMOKE, "--checkpoint", str(smoke_run / "checkpoint")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert result["accuracy"] == summary["final_accuracy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["train", "--config", SMOKE, "train.stepz=3"], "unknown key train.stepz"),
        (
            ["train", "--config", SMOKE, "estimator.name=zo_nope"],
            "unknown estimator 'zo_nope'; choose one of",
        ),
        (["train", "--config", SMOKE, "estimator.lr=fast"], "estimator.lr: expected a number"),
        (["train", "--config", SMOKE, "estimator.momentum=0.9"], "unknown key estimator.momentum"),
        (["train", "--config", SMOKE, "model.name=no-such-model"], "model.name 'no-such-model'"),
        (["train", "--config", SMOKE, "task.name=no-such-task"], "task.name 'no-such-task'"),
        (["replay", "/nonexistent/run", "--out", "x"], "is not a zo run"),
        (["eval", "--config", SMOKE, "--checkpoint", "/nonexistent"], "no checkpoint there"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert zo(*args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_an_existing_run_is_never_overwritten(smoke_run, capsys):
    before = (smoke_run / "trajectory.jsonl").read_bytes()
    assert zo("train", "--config", SMOKE, f"train.out={smoke_run}", *QUIET) == 2
    assert "already holds a run; pass resume=true" in capsys.readouterr().err
    assert (smoke_run / "trajectory.jsonl").read_bytes() == before


def test_resume_needs_a_run(tmp_path, capsys):
    assert zo("train", "--config", SMOKE, f"train.out={tmp_path / 'none'}", "resume=true") == 2
    assert "holds no run to continue" in capsys.readouterr().err


def test_resume_refuses_a_changed_estimator(smoke_run, capsys):
    args = ["train", "--config", SMOKE, f"train.out={smoke_run}", "resume=true", "estimator.lr=0.5"]
    assert zo(*args) == 2
    assert "estimator differs" in capsys.readouterr().err


def test_argparse_usage_errors_exit_2():
    with pytest.raises(SystemExit) as error:
        zo("train")
    assert error.value.code == 2


def test_every_shipped_config_validates(capsys, monkeypatch):
    shipped = shipped_configs(ROOT / "experiments")
    assert shipped, "no shipped configs found"
    monkeypatch.chdir(ROOT)  # `zo validate` reads the experiments/ folder where it runs
    assert zo("validate") == 0
    assert capsys.readouterr().out.count("ok ") == len(shipped)


def test_validate_reports_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {name: tiny-llama}\ntask: {name: sentiment}\nestimator:\n  name: zo_sgd\n  lr: [1]\n"
    )
    assert zo("validate", str(bad)) == 2
    assert "estimator.lr: expected a number" in capsys.readouterr().out


def test_list(capsys):
    assert zo("list") == 0
    out = capsys.readouterr().out
    assert "zo_sgd" in out and "sentiment" in out and "tiny-llama" in out


def test_module_commands_take_their_own_options(capsys, tmp_path):
    args = ["plan", "--model", "llama-2-7b", "--quant", "nf4", "--trainable", "mask:0.001"]
    assert zo(*args, "--batch", "16", "--seq-len", "256", "--device", "cuda", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan  # the planner's own tests check the numbers
    assert zo("plan", "--model", "no-such-size") == 2
    assert "no-such-size" in capsys.readouterr().err
    assert zo("mask", "--model", "tiny-llama", "--out", str(tmp_path / "m"), "--density", "2") == 2
    assert "density" in capsys.readouterr().err
    with pytest.raises(SystemExit) as help_exit:
        zo("merge", "--help")
    assert help_exit.value.code == 0 and "zo merge" in capsys.readouterr().out
