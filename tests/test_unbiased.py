"""Every seed-replayable gradient estimator is unbiased on a quadratic (statistical bound).

The estimators that share ZO-SGD's estimate (sign, momentum, conservative, ZO-Adam...)
differ only in how they turn it into an update, so the estimate itself is checked here
for every one of them: a new estimator that changes the estimate is checked too.
Estimators that need a model (block-wise ZO) have their own restricted-gradient test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import estimators
from tests.test_zo_sgd import Quadratic

SAMPLES = 3000


def _unbiased_cases() -> list[tuple[str, bool]]:
    cases = []
    for name in estimators.available_estimators():
        spec = estimators.get_estimator(name)
        if not spec.traits.zeroth_order or spec.traits.needs_model:
            continue
        fields = {f.name for f in dataclasses.fields(spec.config_class)}
        cases += [
            (name, one_point) for one_point in ([False, True] if "one_point" in fields else [False])
        ]
    return cases


@pytest.mark.parametrize(("name", "one_point"), _unbiased_cases())
def test_gradient_estimate_is_unbiased_on_a_quadratic(name, one_point):
    dim = 6
    model = Quadratic(dim)
    options = {"one_point": True} if one_point else {}
    optimizer = estimators.build_estimator(name, model.parameters(), lr=0.0, seed=1, **options)
    total = torch.zeros(dim, dtype=torch.float64)
    for _ in range(SAMPLES):
        estimate = optimizer.estimate(model)
        for seed, scalar in zip(estimate.seeds, estimate.scalars, strict=True):
            direction = optimizer.engine.direction(seed, 0).double()
            total += scalar * direction / len(estimate.seeds)
        optimizer.step()
    mean, true = total / SAMPLES, model.gradient()
    # per coordinate, Var[(g.z) z_j] = |g|^2 + g_j^2 for Gaussian z
    standard_error = ((true.square().sum() + true.square()) / SAMPLES).sqrt()
    assert torch.all((mean - true).abs() < 5 * standard_error), (mean, true)
