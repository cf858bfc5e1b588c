"""A closure a ZO estimator cannot use gets an error naming the fix, not torch's raw error or a
silent zero gradient: one that calls backward(), one that reads parameters without running
the model (no perturbed module ran, so the loss could never see the perturbation)."""

from __future__ import annotations

import pytest
import torch

import estimators
from tests.test_engine import TiedLM, engine_for
from tests.test_zo_sgd import lm_loss
from zo.engine import UnperturbedForwardError

ZEROTH_ORDER = ["zo_sgd", "zo_adam", "zo_sgd_sign", "zo_sgd_conservative"]


def build(name: str, model: TiedLM):
    return estimators.build_estimator(
        name, list(model.named_parameters()), model=model, lr=1e-2, eps=1e-3
    )


def weights(model: TiedLM) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: TiedLM, before: list[torch.Tensor]) -> bool:
    return all(p.equal(b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("name", ZEROTH_ORDER)
def test_a_closure_that_calls_backward_is_told_to_return_the_loss(name):
    model = TiedLM()
    optimizer = build(name, model)
    before = weights(model)

    def closure():
        optimizer.zero_grad()
        loss = lm_loss(model)
        loss.backward()
        return loss

    for call in (lambda: optimizer.step(closure), lambda: optimizer.estimate(closure)):
        with pytest.raises(estimators.ClosureError, match=r"called backward\(\)") as raised:
            call()
        assert "without calling loss.backward()" in str(raised.value)
        assert "does not require grad" in str(raised.value.__cause__)  # torch's, kept as cause
    assert unchanged(model, before) and optimizer.step_count == 0


@pytest.mark.parametrize("name", ZEROTH_ORDER)
def test_a_closure_that_reads_parameters_without_the_model_is_refused(name):
    """Before the check this gave plus == minus: a zero projected gradient, silently."""
    model = TiedLM()
    optimizer = build(name, model)
    before = weights(model)
    for closure in (
        lambda: sum(p.square().sum() for p in model.parameters()),
        lambda: model.proj.weight.data.sum() + 0.0,
    ):
        with pytest.raises(UnperturbedForwardError, match="calling the model"):
            optimizer.step(closure)
    assert unchanged(model, before) and optimizer.step_count == 0
    optimizer.step(lambda: lm_loss(model))  # a closure that runs the model is fine
    assert optimizer.step_count == 1 and optimizer.last_record.scalars[0] != 0.0


def test_other_errors_of_a_closure_pass_through_unchanged():
    model = TiedLM()
    optimizer = build("zo_sgd", model)

    def closure():
        return model(torch.tensor([[1000]]))  # an index out of the embedding's range

    with pytest.raises(IndexError):
        optimizer.step(closure)


def test_the_engine_checks_its_own_perturbed_pass():
    """The check is the engine's (any caller of perturbed() gets it), and costs nothing when
    every scale is 0 (no perturbation to see) or the body raises (its error stands)."""
    model = TiedLM()
    engine = engine_for(model)
    with pytest.raises(UnperturbedForwardError), engine.perturbed(seed=1, scale=1e-3):
        pass
    with engine.perturbed(seed=1, scale=0.0):
        pass
    with pytest.raises(KeyError), engine.perturbed(seed=1, scale=1e-3):
        raise KeyError("the body's own error")
    with engine.perturbed(seed=1, scale=1e-3):
        model(torch.tensor([[1, 2]]))
