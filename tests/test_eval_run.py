"""`zo eval RUN`: a run directory stands in for its config and checkpoint; a checkpoint that
does not fit the config it is loaded into is a usage error (exit 2), never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zo.cli import main
from zo.models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")
QUICK = [
    "train.progress=false",
    "train.steps=2",
    "train.eval_before=false",
    "task.eval_limit=8",
    "model.device=cpu",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--config", SMOKE, f"train.out={out}", *QUICK]) == 0
    return out


def evaluation(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_run_directory_stands_in_for_its_config_and_checkpoint(run, capsys):
    result = evaluation(capsys, str(run))
    summary = json.loads((run / "summary.json").read_text())
    assert (result["task"], result["split"]) == ("sentiment", "dev")
    assert result["score"] == summary["final_score"]
    explicit = ["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoint")]
    assert evaluation(capsys, *explicit) == result
    base = evaluation(capsys, "--config", str(run / "config.yaml"))  # no checkpoint: the base
    assert base["loss"] != result["loss"]


def test_split_task_and_overrides_apply_to_the_runs_config(run, capsys):
    train_split = evaluation(capsys, str(run), "--split", "train")  # sentiment has no test
    explicit = ["--config", str(run / "config.yaml"), "--checkpoint", str(run), "--split", "train"]
    assert train_split["split"] == "train" and evaluation(capsys, *explicit) == train_split
    # overrides may follow the options; --task drops the run's task options
    other = evaluation(capsys, str(run), "--task", "sst2", "--split", "test", "task.fixtures=true")
    assert other["task"] == "sst2" and other["split"] == "test"
    assert evaluation(capsys, "task.eval_limit=3", str(run))["num_examples"] == 3


def test_a_moved_base_checkpoint_is_the_same_model(tmp_path, capsys):
    """The model check compares weights when the name differs: a moved directory passes."""
    model, tokenizer = tiny_model("llama", seed=4)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    train = ["train", "--config", SMOKE, f"train.out={out}", f"model.name={tmp_path / 'base'}"]
    assert main([*train, *QUICK]) == 0
    shutil.move(tmp_path / "base", tmp_path / "moved")
    result = evaluation(capsys, str(out), f"model.name={tmp_path / 'moved'}")
    assert result["score"] == json.loads((out / "summary.json").read_text())["final_score"]


def other_llama(tmp_path: Path) -> Path:
    """Another model with the run's tensor names and shapes (tiny-llama of another seed)."""
    model, tokenizer = tiny_model("llama", seed=5)
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def bare_run(tmp_path: Path, source: Path) -> Path:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(source / "config.yaml", bare / "config.yaml")
    (bare / "trajectory.jsonl").write_text(
        (source / "trajectory.jsonl").read_text().splitlines()[0] + "\n"
    )
    return bare


def damaged_run(tmp_path: Path, source: Path) -> Path:
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    (damaged / "checkpoint" / "trainable.safetensors").write_bytes(b"\0" * 16)
    return damaged


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other trainable set", "does not fit the model and trainable set"),
        ("other model", "was trained on model 'tiny-llama'"),
        ("other dtype", "torch.float32, the model of the config has"),
        ("no checkpoint", "has no checkpoint yet"),
        ("damaged", "checkpoint/trainable.safetensors"),
        ("not a run", "is not a zo run"),
        ("run and config", "not both"),
        ("nothing", "give a run directory"),
        ("two runs", "give one run directory"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_a_usage_error(case, message, run, tmp_path, capsys):
    checkpoint = ["--config", SMOKE, "--checkpoint", str(run / "checkpoint")]
    args = {
        "other trainable set": lambda: [*checkpoint, "trainable=names:*norm*"],
        "other model": lambda: [*checkpoint, f"model.name={other_llama(tmp_path)}"],
        "other dtype": lambda: [str(run), "model.dtype=bfloat16"],
        "no checkpoint": lambda: [str(bare_run(tmp_path, run))],
        "damaged": lambda: [str(damaged_run(tmp_path, run))],
        "not a run": lambda: [str(tmp_path)],
        "run and config": lambda: [str(run), "--config", SMOKE],
        "nothing": lambda: ["--split", "test"],
        "two runs": lambda: [str(run), str(tmp_path)],
    }[case]()
    assert main(["eval", *args]) == 2
    assert message in capsys.readouterr().err
