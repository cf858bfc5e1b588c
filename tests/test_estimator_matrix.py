"""Every registered estimator through the same checks: the generic matrix of issue 6.

A new estimator joins by registering itself; if it needs settings to run at all (a
first-order part for hybrid, say), it gets an entry in ``SETTINGS``.
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
SETTINGS: dict[str, dict] = {
    "hybrid": {"first_order": ["*.layers.1.*"]},
}
LR = {"lomo": 1e-2, "sgd": 1e-2, "adamw": 1e-3}


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
    settings = {"lr": LR.get(name, 1e-3), **SETTINGS.get(name, {})}
    optimizer = estimators.build_estimator(name, named, model=model, seed=7, **settings)
    return model, tokenizer, optimizer


def _train(model, optimizer, batches) -> list[float]:
    return [
        optimizer.step(lambda b=batch: tasks.classification_loss(model, b)) for batch in batches
    ]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


ALL = estimators.available_estimators()


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


def test_first_order_estimators_leave_no_trajectory() -> None:
    for name in ALL:
        if estimators.get_estimator(name).traits.zeroth_order:
            continue
        model, tokenizer, optimizer = _build(name, "llama")
        _train(model, optimizer, _batches(tokenizer, 1))
        assert getattr(optimizer, "last_record", None) is None, name
