"""The README's "Add an estimator": its file and its matrix line are all an estimator needs.

The README's example is run as written (registered for one test at a time), then put
through the matrix and contract tests, the training loop, replay and ``zo plan``.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import estimators
import tasks
from estimators.registry import _ESTIMATORS
from tests import test_estimator_contract as contract
from tests import test_estimator_matrix as matrix
from zo.cli import main

ROOT = Path(__file__).resolve().parent.parent
SECTION = re.search(r"## Add an estimator\n(.*?)\n## ", (ROOT / "README.md").read_text(), re.S)
FILE, MATRIX_LINE = re.findall(r"```python\n(.*?)```", SECTION.group(1), re.S)
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")


@pytest.fixture
def readme_estimator(monkeypatch) -> str:
    """The README's file imported as a module, its registration undone after the test."""
    monkeypatch.setattr(_ESTIMATORS, "_entries", dict(_ESTIMATORS._entries))
    module = types.ModuleType("readme_estimator")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(FILE, "README.md: Add an estimator", "exec"), module.__dict__)
    ((name, settings),) = ast.literal_eval("{" + MATRIX_LINE + "}").items()
    monkeypatch.setitem(matrix.MATRIX, name, settings)
    return name


def test_the_example_keeps_the_contract(readme_estimator):
    spec = estimators.get_estimator(readme_estimator)
    contract.test_every_trait_is_there_and_consistent(spec)
    contract.test_the_built_estimator_keeps_the_contract(spec)
    contract.test_the_constructor_takes_exactly_the_configs_fields(spec)
    contract.test_no_config_declares_a_field_of_its_bases_again(spec.config_class)


def test_its_matrix_line_runs_the_matrix(readme_estimator):
    matrix.test_steps_change_trainable_tensors_only(readme_estimator, "llama")
    matrix.test_state_dict_round_trip_resumes_bit_exactly(readme_estimator)
    matrix.test_seed_replayable_estimators_replay_from_their_records(readme_estimator)


def _steps(monkeypatch, name: str, **settings) -> dict[str, torch.Tensor]:
    monkeypatch.setitem(matrix.MATRIX, name, {"lr": 1e-2, **settings})
    model, tokenizer, optimizer = matrix._build(name, "llama")
    for batch in matrix._batches(tokenizer, 3):
        optimizer.step(lambda b=batch: tasks.classification_loss(model, b))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_it_is_zo_sgd_with_clipped_projected_gradients(readme_estimator, monkeypatch):
    """Against the reference: ZO-SGD bit for bit when nothing is clipped, not otherwise."""
    zo_sgd = _steps(monkeypatch, "zo_sgd")
    unclipped = _steps(monkeypatch, readme_estimator, clip=1e9)
    clipped = _steps(monkeypatch, readme_estimator, clip=1e-6)
    assert all(torch.equal(unclipped[n], zo_sgd[n]) for n in zo_sgd)
    assert not all(torch.equal(clipped[n], zo_sgd[n]) for n in zo_sgd)


def test_it_trains_replays_and_plans_with_nothing_else_added(readme_estimator, tmp_path):
    out, replayed = tmp_path / "run", tmp_path / "replayed"
    settings = [f"estimator.name={readme_estimator}", "estimator.clip=0.5", "train.steps=4"]
    quiet = ["train.progress=false", "train.eval_before=false"]
    assert main(["train", "--config", SMOKE, f"train.out={out}", *settings, *quiet]) == 0
    assert main(["replay", str(out), "--out", str(replayed)]) == 0
    trained = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    rebuilt = load_file(str(replayed / "trainable.safetensors"))
    assert trained.keys() == rebuilt.keys()
    assert all(torch.equal(trained[n], rebuilt[n]) for n in trained)
    assert main(["plan", "--model", "tiny-llama", "--estimator", readme_estimator]) == 0
