"""The 8 GiB path through the loop: `zo mask`, then ZO on a sparse fp32 delta over a frozen
NF4 base (`model.quant=nf4`, `trainable=mask:PATH`), replay, and LoRA over the 4-bit base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zo.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")
QUICK = ["train.progress=false", "train.steps=3", "train.eval_before=false", "task.eval_limit=8"]


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mask") / "tiny.safetensors"
    args = ["mask", "--model", "tiny-llama", "--out", str(out), "--density", "0.01"]
    assert main([*args, "--tokens", "128", "--seq-len", "32", "--batch-size", "4"]) == 0
    return out


def header(run: Path) -> dict:
    return json.loads((run / "trajectory.jsonl").read_text().splitlines()[0])


def test_zo_on_a_sparse_delta_over_nf4_trains_and_replays(mask_file, tmp_path):
    run = tmp_path / "run"
    quant = ["model.quant=nf4", f"trainable=mask:{mask_file}"]
    assert main(["train", "--config", SMOKE, f"train.out={run}", *QUICK, *quant]) == 0
    manifest = header(run)["trainable"]
    assert manifest and all(t["name"].endswith(".values") for t in manifest)
    assert all(t["dtype"] == "float32" and len(t["shape"]) == 1 for t in manifest)
    trained = load_file(str(run / "checkpoint" / "trainable.safetensors"))
    assert any(tensor.abs().sum() > 0 for tensor in trained.values())  # the values moved
    assert main(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    replayed = load_file(str(tmp_path / "replayed" / "trainable.safetensors"))
    assert all(replayed[name].equal(trained[name]) for name in trained)


def test_forward_grad_through_the_4bit_base(mask_file, tmp_path):
    config = tmp_path / "fg.yaml"
    smoke = Path(SMOKE).read_text().replace("  lr: 1.0e-3\n  eps: 1.0e-3\n", "  lr: 1.0e-3\n")
    config.write_text(smoke.replace("zo_sgd", "forward_grad"))
    quant = ["model.quant=nf4", f"trainable=mask:{mask_file}"]
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), f"train.out={run}", *QUICK, *quant]) == 0
    steps = [json.loads(x) for x in (run / "trajectory.jsonl").read_text().splitlines()[1:]]
    # forward-mode AD through the dequantized base: non-zero directional derivatives
    assert all(abs(step["scalars"][0]) > 0 for step in steps)


def test_lora_over_nf4(tmp_path):
    run = tmp_path / "run"
    lora = ["model.quant=nf4", "trainable.kind=lora", "trainable.lora_r=2"]
    assert main(["train", "--config", SMOKE, f"train.out={run}", *QUICK, *lora]) == 0
    names = [t["name"] for t in header(run)["trainable"]]
    assert names and all("lora_" in name for name in names)


def test_full_training_over_a_4bit_base_is_a_usage_error(tmp_path, capsys):
    args = ["train", "--config", SMOKE, f"train.out={tmp_path / 'run'}", "model.quant=nf4"]
    assert main(args) == 2
    assert "freezes the base weights in 4 bits" in capsys.readouterr().err


def test_a_missing_mask_file_is_a_usage_error(tmp_path, capsys):
    args = ["train", "--config", SMOKE, f"train.out={tmp_path / 'run'}"]
    assert main([*args, f"trainable=mask:{tmp_path / 'none.safetensors'}"]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
