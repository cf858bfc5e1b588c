"""The training loop across task kinds and objectives: what the closure returns, which
estimator may train on what, and replay of runs on generation tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zo.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")
QUICK = ["train.progress=false", "train.steps=3", "train.save_every=0", "train.log_every=1"]

QA_ROWS = [
    {"context": "The cat sat on the mat.", "question": "Where did the cat sit?", "answer": "mat"},
    {"context": "Paris is in France.", "question": "Where is Paris?", "answer": "France"},
    {"context": "Bees make honey.", "question": "What do bees make?", "answer": "honey"},
    {"context": "Ice is cold.", "question": "What is ice?", "answer": "cold"},
]


def write_qa_task(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        lines = [json.dumps(row) for row in QA_ROWS]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def qa_overrides(directory: Path) -> list[str]:
    return [
        "task.name=jsonl",
        f"task.path={directory}",
        "task.template=Context: {context}\\nQuestion: {question}\\nAnswer:",
        "task.target=answer",
        "task.max_length=96",
        "train.batch_size=2",
    ]


def step_losses(run: Path) -> list[float]:
    lines = (run / "trajectory.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"type": "step"' in line]


def test_generation_task_trains_with_zo_and_replays_bit_for_bit(tmp_path, capsys):
    data = write_qa_task(tmp_path / "qa")
    run = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"train.out={run}", *QUICK, *qa_overrides(data)]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "squad_f1" and 0.0 <= summary["final_score"] <= 1.0
    assert summary["final_accuracy"] is None  # generation has no candidate accuracy
    assert all(loss > 0 for loss in step_losses(run))  # teacher-forcing NLL
    assert main(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    replayed = load_file(str(tmp_path / "replayed" / "trainable.safetensors"))
    trained = load_file(str(run / "checkpoint" / "trainable.safetensors"))
    assert all(replayed[name].equal(trained[name]) for name in trained)


def test_metric_objective_trains_zo_on_minus_f1(tmp_path):
    data = write_qa_task(tmp_path / "qa")
    run = tmp_path / "run"
    args = [*qa_overrides(data), "task.objective=f1", "task.max_length=64"]
    assert main(["train", "--config", SMOKE, f"train.out={run}", *QUICK, *args]) == 0
    losses = step_losses(run)
    assert len(losses) == 3 and all(-1.0 <= loss <= 0.0 for loss in losses)


def test_accuracy_objective_on_a_classification_task(tmp_path):
    run = tmp_path / "run"
    args = ["task.objective=accuracy", "train.batch_size=8"]
    assert main(["train", "--config", SMOKE, f"train.out={run}", *QUICK, *args]) == 0
    # minus the accuracy of 8 argmax predictions: a multiple of 1/8 in [-1, 0]
    assert all(-1 <= loss <= 0 and (loss * 8).is_integer() for loss in step_losses(run))


@pytest.mark.parametrize("estimator", ["sgd", "lomo", "forward_grad"])
def test_gradient_estimators_refuse_a_metric_objective(estimator, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    smoke = Path(SMOKE).read_text()
    config.write_text(
        smoke.replace("  lr: 1.0e-3\n  eps: 1.0e-3\n", "").replace("zo_sgd", estimator)
    )
    run = tmp_path / "run"
    args = ["train", "--config", str(config), f"train.out={run}", "task.objective=accuracy"]
    assert main([*args, *QUICK]) == 2
    assert "needs the gradient of its loss" in capsys.readouterr().err
    assert not run.exists()


def test_replaying_a_hybrid_run_is_a_usage_error(tmp_path, capsys):
    run = tmp_path / "run"
    hybrid = ["estimator.name=hybrid", "estimator.first_order=[model.norm.*]"]
    assert main(["train", "--config", SMOKE, f"train.out={run}", *QUICK, *hybrid]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] is not None  # logged, though no trajectory records exist
    capsys.readouterr()
    assert main(["replay", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "not seed-replayable" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_with_calibration_reports_the_metric(capsys):
    assert main(["eval", "--config", SMOKE, "task.calibrate=true", "task.eval_limit=8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "accuracy" and result["num_examples"] == 8


def test_an_estimator_refusing_its_parameters_is_a_usage_error(tmp_path, capsys):
    run = tmp_path / "run"
    hybrid = ["estimator.name=hybrid", "estimator.first_order=[no_such.*]"]
    assert main(["train", "--config", SMOKE, f"train.out={run}", *QUICK, *hybrid]) == 2
    assert "match no trainable tensor" in capsys.readouterr().err
    assert not run.exists()
