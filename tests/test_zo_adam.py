"""ZO-Adam against torch.optim.AdamW fed the same zeroth-order gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from estimators.zo_adam import ZOAdam
from tests.test_engine import TiedLM
from tests.test_zo_sgd import lm_loss
from tests.test_zo_variants import SMALL_CHUNKS, g_hat, two_groups

STEPS = 4


@pytest.mark.parametrize("queries", [1, 3])
def test_matches_reference_adamw_fed_the_zo_gradient(queries):
    model = TiedLM()
    reference = copy.deepcopy(model)
    settings = {"lr": 1e-2, "weight_decay": 0.1}
    optimizer = ZOAdam(two_groups(model), **settings, queries=queries, seed=3, engine=SMALL_CHUNKS)
    reference_groups = two_groups(reference)
    del reference_groups[1]["eps"]  # the ZO perturbation scale; torch would read Adam's eps
    adamw = torch.optim.AdamW(
        reference_groups, betas=(0.9, 0.999), eps=1e-8, foreach=False, **settings
    )
    for _ in range(STEPS):
        estimate = optimizer.estimate(lambda: lm_loss(model))
        optimizer.step()
        for index, param in enumerate(reference.parameters()):
            group = 0 if index < 3 else 1
            param.grad = g_hat(
                optimizer.engine,
                estimate.seeds,
                estimate.scalars,
                index,
                optimizer.direction_scale(group),
            )
        adamw.step()
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_moments_are_two_fp32_copies_of_the_trainable_set_only():
    model = TiedLM().to(torch.bfloat16)
    model.norm.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = ZOAdam(trainable, lr=1e-3)
    optimizer.step(lambda: lm_loss(model))
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
    )
    assert state_bytes == 2 * 4 * sum(p.numel() for p in trainable)
    assert all(t.dtype == torch.float32 for s in optimizer.state.values() for t in s.values())


def test_bad_betas_name_the_problem():
    with pytest.raises(ValueError, match="beta1 must be in"):
        ZOAdam(TiedLM().parameters(), beta1=1.0)
    with pytest.raises(ValueError, match="adam_eps must be > 0"):
        ZOAdam(TiedLM().parameters(), adam_eps=0.0)
