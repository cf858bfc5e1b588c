"""`zo bench compare`: methods train in their own processes; one table, one plot."""

from __future__ import annotations

import json
from pathlib import Path

from zo.commands import USAGE_EXIT, main


def _plan(tmp_path, estimators: str) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(
        "base: experiments/tiny/smoke.yaml\n"
        "overrides: [train.steps=4, train.log_every=1, train.eval_before=false]\n"
        f"estimators:\n{estimators}"
    )
    return str(path)


def test_compare_trains_each_method_and_tabulates(tmp_path, capsys):
    plan = _plan(tmp_path, "  zo_sgd: {lr: 1.0e-3, eps: 1.0e-3}\n")
    assert main(["bench", "compare", "--config", plan, "--out", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    (result,) = json.loads(lines[0])
    assert result["estimator"] == "zo_sgd" and result["steps"] == 4
    assert any(line.startswith("| zo_sgd |") for line in lines)
    figure = lines[-1].removeprefix("loss curves: ")
    assert figure.endswith("loss_curves.png") and (tmp_path / "runs").exists()
    assert Path(figure).read_bytes()[:4] == b"\x89PNG"


def test_comparison_plans_validate_per_method(tmp_path, capsys):
    good = _plan(tmp_path, "  zo_sgd: {lr: 1.0e-3}\n")
    assert main(["validate", good]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: experiments/tiny/smoke.yaml\nestimators:\n  zo_sgd: {lr: fast}\n")
    assert main(["validate", str(bad)]) == USAGE_EXIT
    assert "estimator.lr: expected a number" in capsys.readouterr().out


def test_unknown_estimator_in_a_plan_is_a_usage_error(tmp_path, capsys):
    plan = _plan(tmp_path, "  zo_magic: {}\n")
    assert main(["bench", "compare", "--config", plan]) == USAGE_EXIT
    assert "unknown estimator 'zo_magic'" in capsys.readouterr().err


def test_continue_reads_finished_methods_back_and_trains_the_rest(tmp_path, capsys):
    plan = _plan(tmp_path, "  zo_sgd: {lr: 1.0e-3}\n  zo_sgd_sign: {lr: 1.0e-4}\n")
    runs = tmp_path / "runs"
    args = ["bench", "compare", "--config", plan, "--out", str(runs)]
    assert main([*args, "--only", "zo_sgd"]) == 0
    (parent,) = runs.iterdir()
    first = (parent / "zo_sgd" / "trajectory.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*args, "--continue", str(parent)]) == 0
    out = capsys.readouterr()
    assert "reading the finished zo_sgd run" in out.err and "training zo_sgd_sign" in out.err
    assert [r["estimator"] for r in json.loads(out.out.splitlines()[0])] == [
        "zo_sgd",
        "zo_sgd_sign",
    ]
    assert (parent / "zo_sgd" / "trajectory.jsonl").read_bytes() == first  # not retrained
    assert main([*args, "--continue", str(tmp_path / "nowhere")]) == USAGE_EXIT


def test_methods_may_be_labelled_to_compare_trainable_sets(tmp_path):
    from zo.commands.compare import method_configs

    plan = _plan(
        tmp_path,
        "  full: {estimator: zo_sgd, lr: 1.0e-4}\n"
        "  norms: {estimator: zo_sgd, lr: 1.0e-3, overrides: ['trainable=names:*norm*']}\n",
    )
    (full_label, full), (norms_label, norms) = method_configs(plan)
    assert (full_label, norms_label) == ("full", "norms")
    assert full.estimator == {"name": "zo_sgd", "lr": 1.0e-4}
    assert norms.trainable.kind == "names" and norms.trainable.patterns == ["*norm*"]
    assert full.trainable.kind == "full"
