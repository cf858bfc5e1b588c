"""Every registered estimator through the same checks: the generic matrix of issue 6.

A new estimator joins with one line in ``MATRIX``: its name and the settings it trains the
tiny models with (a first-order part for hybrid, say). A test fails while an estimator of
the ``estimators`` package has no line.
"""

from __future__ import annotations

import fnmatch
import io

import pytest
import torch

import estimators
import tasks
from zo.models import tiny_model

FAMILIES = ["llama", "opt"]
TRAINABLE = ["*.layers.*"]  # embeddings and head stay frozen, so "frozen stays frozen" is tested
MATRIX: dict[str, dict] = {
    "adamw": {"lr": 1e-3},
    "block_zo": {"lr": 1e-3},
    "forward_grad": {"lr": 1e-3},
    "hybrid": {"lr": 1e-3, "first_order": ["*.layers.1.*"]},
    "lomo": {"lr": 1e-2},
    "sgd": {"lr": 1e-2},
    "zo_adam": {"lr": 1e-3},
    "zo_sgd": {"lr": 1e-3},
    "zo_sgd_conservative": {"lr": 1e-3},
    "zo_sgd_momentum": {"lr": 1e-3},
    "zo_sgd_sign": {"lr": 1e-3},
}
"""Estimator name -> the settings its steps here use: one line per estimator."""


def _batches(tokenizer, count: int = 4):
    examples = tasks.get_task("sentiment").load("train")
    return [
        tasks.encode_candidates(tokenizer, tasks.get_task("sentiment"), examples[4 * i : 4 * i + 4])
        for i in range(count)
    ]


def _build(name: str, family: str, seed: int = 0):
    model, tokenizer = tiny_model(family, seed=seed)
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if any(fnmatch.fnmatchcase(n, pat) for pat in TRAINABLE)
    ]
    chosen = {id(p) for _, p in named}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = estimators.build_estimator(name, named, model=model, seed=7, **MATRIX[name])
    return model, tokenizer, optimizer


def _train(model, optimizer, batches) -> list[float]:
    return [
        optimizer.step(lambda b=batch: tasks.classification_loss(model, b)) for batch in batches
    ]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


ALL = sorted(MATRIX)


def test_every_estimator_of_the_package_has_a_line():
    """Registered by a module of ``estimators`` (a test may register a toy one elsewhere)."""
    registered = estimators.ESTIMATORS.values()
    package = {s.name for s in registered if s.impl.__module__.startswith("estimators.")}
    assert package == set(MATRIX), "add a line to MATRIX for each new estimator"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ALL)
def test_steps_change_trainable_tensors_only(name: str, family: str) -> None:
    model, tokenizer, optimizer = _build(name, family)
    before = _snapshot(model)
    losses = _train(model, optimizer, _batches(tokenizer, 2))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    after = _snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, f"{name} changed nothing"
    assert changed <= trainable, f"{name} changed frozen tensors {sorted(changed - trainable)}"


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_resumes_bit_exactly(name: str) -> None:
    model, tokenizer, optimizer = _build(name, "llama")
    batches = _batches(tokenizer, 4)
    _train(model, optimizer, batches)
    uninterrupted = _snapshot(model)

    model, _, optimizer = _build(name, "llama")
    _train(model, optimizer, batches[:2])
    buffer = io.BytesIO()
    torch.save({"weights": _snapshot(model), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed_model, _, resumed = _build(name, "llama")
    with torch.no_grad():
        for n, p in resumed_model.named_parameters():
            p.copy_(saved["weights"][n])
    resumed.load_state_dict(saved["optimizer"])
    _train(resumed_model, resumed, batches[2:])
    for n, p in resumed_model.named_parameters():
        assert torch.equal(p, uninterrupted[n]), f"{name}: {n} differs after resume"


@pytest.mark.parametrize(
    "name", [n for n in ALL if estimators.get_estimator(n).traits.zeroth_order]
)
def test_seed_replayable_estimators_replay_from_their_records(name: str) -> None:
    model, tokenizer, optimizer = _build(name, "llama")
    records = []
    for batch in _batches(tokenizer, 3):
        optimizer.step(lambda b=batch: tasks.classification_loss(model, b))
        records.append(estimators.StepRecord.from_dict(optimizer.last_record.to_dict()))
    replayed_model, _, replayer = _build(name, "llama")
    for record in records:
        replayer.apply_record(record)
    for (n, p), q in zip(model.named_parameters(), replayed_model.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: {n} differs after replay"


@pytest.mark.parametrize(
    "name", [n for n in ALL if not estimators.get_estimator(n).traits.replayable]
)
def test_estimators_that_do_not_replay_leave_no_record(name: str) -> None:
    model, tokenizer, optimizer = _build(name, "llama")
    _train(model, optimizer, _batches(tokenizer, 1))
    assert optimizer.last_record is None
    with pytest.raises(estimators.NotReplayableError, match="checkpoint"):
        optimizer.skip_step("a non-finite loss")
