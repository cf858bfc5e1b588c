"""Bad input refused before any model loads, exit code 2, naming the key or the file:
`train.out`, the device, the batch (against the data and against memory), config files,
data files that are not UTF-8, and resume settings that would change a schedule."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

import estimators
import zo.preflight as preflight
import zo.train as loop
from tests.test_cli import SMOKE, zo
from zo.config import ConfigError, load_config
from zo.memory import shapes
from zo.memory.shapes import PRESETS, PlanError

QUIET = ["train.progress=false", "train.eval_before=false", "task.eval_limit=4"]


class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every refusal here must come before it."""

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model was loaded for a run that should have been refused")

    monkeypatch.setattr(loop, "load_base_model", refuse)


def train(*overrides: str, config: str = SMOKE) -> int:
    return zo("train", "--config", config, *overrides, *QUIET)


# ---------------------------------------------------------------------- train.out


def test_an_empty_train_out_is_refused(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    assert train("train.out=") == 2
    assert "train.out is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


def test_a_file_as_train_out_is_refused(tmp_path, capsys, no_model):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert train(f"train.out={existing}") == 2
    assert f"train.out {existing} exists and is not a directory" in capsys.readouterr().err
    assert train(f"train.out={existing / 'run'}") == 2
    assert f"{existing} is a file" in capsys.readouterr().err
    assert existing.read_text() == "mine"


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_an_unwritable_train_out_is_refused(capsys, no_model):
    assert train("train.out=/proc/zo-run") == 2  # no user can create a directory in /proc
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_train_out_is_refused(tmp_path, capsys, no_model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert train(f"train.out={locked / 'run'}") == 2
        assert f"{locked}, where it would go, is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------- the device


def test_an_unknown_device_is_a_config_error(tmp_path, capsys, no_model):
    assert train(f"train.out={tmp_path / 'run'}", "model.device=tpu9") == 2
    assert "model.device 'tpu9' is not a device zo trains on" in capsys.readouterr().err
    config = tmp_path / "tpu.yaml"
    config.write_text(
        Path(SMOKE)
        .read_text()
        .replace("  name: tiny-llama\n", "  name: tiny-llama\n  device: tpu9\n")
    )
    assert zo("validate", str(config)) == 2
    assert "model.device 'tpu9'" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error(tmp_path, capsys, no_model):
    assert train(f"train.out={tmp_path / 'run'}", "model.device=cuda") == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


ZO_SGD = estimators.get_estimator("zo_sgd").planned()

# ---------------------------------------------------------------------- the batch


def test_a_batch_larger_than_the_data_is_refused(tmp_path, capsys, no_model):
    out = tmp_path / "run"
    assert train(f"train.out={out}", "train.batch_size=100000000") == 2
    assert (
        "train.batch_size is 100000000, but the training split has 300" in capsys.readouterr().err
    )
    assert train(f"train.out={out}", "task.train_limit=3") == 2
    assert "has 3 examples (task.train_limit=3)" in capsys.readouterr().err
    assert not out.exists()


def test_a_batch_the_planner_says_cannot_fit_is_refused(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.setattr(preflight, "_available_ram", lambda: 64 * 2**20)
    args = [f"train.out={tmp_path / 'run'}", "model.name=smollm2-135m", "model.device=cpu"]
    assert train(*args) == 2
    error = capsys.readouterr().err
    assert "train.batch_size=4: zo plan predicts a peak of" in error
    assert "more than the 64.00 MiB of this machine's available RAM" in error
    assert "train.check_memory=false" in error
    with pytest.raises(ModelLoaded):  # the opt-out goes on to load the model
        train(*args, "train.check_memory=false")


def test_the_planner_reads_a_checkpoint_config(tmp_path, capsys, no_model):
    # a 7B shape, no weights: refused before anything would try to load them
    checkpoint = tmp_path / "llama-7b-shape"
    checkpoint.mkdir()
    config = {**PRESETS["llama-2-7b"], "tie_word_embeddings": False}
    (checkpoint / "config.json").write_text(json.dumps(config))
    overrides = [f"model.name={checkpoint}", "model.device=cpu", "task.max_length=2048"]
    assert train(f"train.out={tmp_path / 'run'}", *overrides, "train.batch_size=256") == 2
    assert "zo plan predicts a peak of" in capsys.readouterr().err


def test_a_run_without_a_memory_model_says_so_once(tmp_path, capsys, monkeypatch):
    def no_shape(name):
        raise PlanError(f"no shape for {name}")

    monkeypatch.setattr(shapes, "resolve_shape", no_shape)
    assert train(f"train.out={tmp_path / 'run'}", "train.steps=2") == 0
    out = capsys.readouterr().out
    assert out.count("memory check: zo plan has no memory model for model tiny-llama") == 1


def test_tiny_models_have_a_memory_model(tmp_path, capsys):
    assert train(f"train.out={tmp_path / 'run'}", "train.steps=1") == 0
    assert "no memory model" not in capsys.readouterr().out


# ---------------------------------------------------------------------- config files


def test_config_files_that_are_not_yaml_text_are_refused(tmp_path, capsys, no_model):
    generator = random.Random(13)
    for case in range(20):
        path = tmp_path / f"random-{case}.yaml"
        path.write_bytes(
            bytes(generator.randrange(256) for _ in range(generator.randrange(1, 400)))
        )
        assert train(f"train.out={tmp_path / 'run'}", config=str(path)) == 2, case
        assert f"config file {path}" in capsys.readouterr().err, case
    assert train(config=str(tmp_path)) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_config_without_model_and_task_is_refused(tmp_path, capsys, no_model):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert train(f"train.out={tmp_path / 'run'}", config=str(empty)) == 2
    assert f"config file {empty} is empty: an experiment names its model and task" in (
        capsys.readouterr().err
    )
    partial = tmp_path / "partial.yaml"
    partial.write_text("model: {name: tiny-llama}\ntrain: {steps: 3}\n")
    assert train(f"train.out={tmp_path / 'run'}", config=str(partial)) == 2
    assert "names no task.name" in capsys.readouterr().err
    # naming them explicitly, even as overrides, is an experiment
    with pytest.raises(ModelLoaded):
        train(f"train.out={tmp_path / 'run'}", "task.name=sentiment", config=str(partial))


# ---------------------------------------------------------------------- data files


def test_a_data_row_that_is_not_utf8_names_its_file_and_line(tmp_path, capsys, no_model):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"row {i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]
    lines = [json.dumps(row).encode() for row in rows]
    lines[5] = b'{"text": "caf\xe9", "label": "neg"}'  # Latin-1, not UTF-8
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    task = [
        "task.name=jsonl",
        f"task.path={data}",
        "task.template=Review {text}",
        "task.label=label",
        "task.verbalizer={pos: ' great', neg: ' awful'}",
    ]
    assert train(f"train.out={tmp_path / 'run'}", *task) == 2
    error = capsys.readouterr().err
    assert f"{data / 'train.jsonl'}:6: not UTF-8 text (byte 0xe9 at column 14)" in error
    # and a template YAML reads as a mapping is named, not a traceback
    assert train(f"train.out={tmp_path / 'run'}", *task[:2], "task.template={text}", *task[3:]) == 2
    assert "template must be text, got {'text': None}" in capsys.readouterr().err


# ---------------------------------------------------------------------- resume


def test_a_resume_may_not_change_the_steps_a_schedule_decays_over(tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"train.out={out}", "train.lr_schedule=linear", "train.save_every=2"]
    assert train(*args, "train.steps=4") == 0
    before = (out / "trajectory.jsonl").read_bytes()
    assert train(*args, "train.steps=8", "resume=true") == 2
    assert "keep train.steps=4" in capsys.readouterr().err
    assert (out / "trajectory.jsonl").read_bytes() == before
    # the constant schedule has no horizon: a run may be extended
    constant = [f"train.out={tmp_path / 'constant'}", "train.save_every=2"]
    assert train(*constant, "train.steps=4") == 0
    assert train(*constant, "train.steps=6", "resume=true") == 0


@pytest.fixture
def small_gpu(monkeypatch):
    """No GPU needed: torch's CUDA queries answer as one 8 GiB GPU would."""

    class Properties:
        total_memory = 8 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Small GPU")
    return torch.device("cuda", 0)


def test_on_cuda_the_gpu_memory_bounds_the_batch(small_gpu):
    preflight.check_device_available(small_gpu)
    with pytest.raises(ConfigError, match=r"this machine has 1 CUDA device\(s\): use cuda:0"):
        preflight.check_device_available(torch.device("cuda", 3))
    config = load_config(SMOKE, ["model.name=llama-2-7b", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"more than the 8.00 GiB of GPU 0 \(Small GPU\)"):
        preflight.check_batch_fits_memory(config, small_gpu, 4, print, ZO_SGD)


def test_offloaded_the_gpu_memory_bounds_what_is_outside_the_blocks(small_gpu):
    """Llama-2-7B's 12.6 GiB of bf16 weights do not fit the 8 GiB GPU, but offloaded only its
    embeddings, head and k + 1 blocks do (the blocks stay in host memory): the batch is
    checked against that plan, and still refused where even that cannot fit."""
    offloaded = ["model.name=llama-2-7b", "model.dtype=bfloat16", "train.parallel=offload"]
    seen = []
    config = load_config(SMOKE, offloaded)
    preflight.check_batch_fits_memory(config, small_gpu, 4, seen.append, ZO_SGD)
    assert seen == []  # checked, and fits
    config = load_config(SMOKE, [*offloaded, "task.max_length=4096"])
    with pytest.raises(ConfigError, match=r"blocks offloaded\), more than the 8.00 GiB"):
        preflight.check_batch_fits_memory(config, small_gpu, 64, print, ZO_SGD)
    lora = load_config(SMOKE, [*offloaded, "trainable.kind=lora"])
    preflight.check_batch_fits_memory(lora, small_gpu, 4, seen.append, ZO_SGD)
    assert "no memory model for this run" in seen[0]  # said, never planned as one device


def test_sharded_each_gpu_holds_its_ranks_rows(small_gpu):
    """Llama-2-7B's 12.6 GiB of bf16 weights do not fit one 8 GiB GPU, but sharded over 4
    ranks each holds a quarter of the blocks: checked against the per-rank plan."""
    sharded = ["model.name=llama-2-7b", "model.dtype=bfloat16", "train.parallel=fsdp"]
    config = load_config(SMOKE, sharded)
    seen = []
    preflight.check_batch_fits_memory(config, small_gpu, 4, seen.append, ZO_SGD, ranks=4)
    assert seen == []  # checked, and fits
    with pytest.raises(ConfigError, match=r"blocks sharded over 1 ranks\), more than the 8.00"):
        preflight.check_batch_fits_memory(config, small_gpu, 4, print, ZO_SGD, ranks=1)
