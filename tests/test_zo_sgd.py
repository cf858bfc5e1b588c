"""ZO-SGD against references: a naive MeZO step, unbiasedness, accumulation, the split API."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import estimators
from estimators import ZOSGD, StepRecord
from tests.test_engine import IDS, TiedLM


def lm_loss(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def naive_mezo_step(model: nn.Module, engine, seed: int, lr: float, eps: float, wd: float = 0.0):
    """MeZO written out densely: materialise W +- eps z, difference, W -= lr (g z + wd W)."""
    params = list(model.parameters())
    directions = [engine.direction(seed, i) for i in range(len(params))]
    with torch.no_grad():
        for p, z in zip(params, directions, strict=True):
            p.add_(eps * z)
        plus = lm_loss(model).item()
        for p, z in zip(params, directions, strict=True):
            p.sub_(2 * eps * z)
        minus = lm_loss(model).item()
        for p, z in zip(params, directions, strict=True):
            p.add_(eps * z)
        grad = (plus - minus) / (2 * eps)
        for p, z in zip(params, directions, strict=True):
            p.sub_(lr * (grad * z + wd * p))
    return grad


def test_matches_naive_mezo_step():
    model, reference = TiedLM(), TiedLM()
    optimizer = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=4)
    optimizer.step(lambda: lm_loss(model))
    record = optimizer.last_record
    grad = naive_mezo_step(reference, optimizer.engine, record.seeds[0], 1e-2, 1e-3, 0.1)
    # A tolerance, not bits: the naive step perturbs in place (W + eps z - 2 eps z + eps z
    # rounds differently from W, and its forwards see those rounded weights) and updates in
    # two roundings per term; the engine sees W + eps z rounded once and restores exactly.
    # Same directions, same formula: the bit-level equalities are in test_engine.py.
    assert record.scalars[0] == pytest.approx(grad, rel=1e-3, abs=1e-3)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_with_closure_equals_estimate_then_step(dtype):
    """The fused, sync-free ``step(closure)`` (coefficients computed on the device) against
    the reference path (scalars read, then ``apply_record``): the same bits."""
    a, b = TiedLM().to(dtype), TiedLM().to(dtype)
    opt_a = ZOSGD(a.parameters(), lr=1e-2, queries=2, seed=1, weight_decay=0.1)
    opt_b = ZOSGD(b.parameters(), lr=1e-2, queries=2, seed=1, weight_decay=0.1)
    for _ in range(3):
        loss_a = opt_a.step(lambda: lm_loss(a))
        estimate = opt_b.estimate(lambda: lm_loss(b))
        loss_b = opt_b.step()
        assert loss_a == loss_b and estimate.scalars == opt_a.last_record.scalars
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_accumulated_micro_batches_equal_one_concatenated_batch():
    ids = torch.randint(0, 40, (8, 6), generator=torch.Generator().manual_seed(0))
    full, micro = TiedLM(), TiedLM()
    opt_full = ZOSGD(full.parameters(), lr=1e-2, seed=3)
    opt_micro = ZOSGD(micro.parameters(), lr=1e-2, seed=3)
    opt_full.step(lambda: lm_loss(full, ids))
    for part in ids.split(2):
        opt_micro.estimate(lambda part=part: lm_loss(micro, part))
    opt_micro.step()
    assert opt_micro.last_record.scalars[0] == pytest.approx(
        opt_full.last_record.scalars[0], rel=1e-3
    )
    # the scalars agree to fp32 rounding of the losses amplified by 1/(2 eps)
    for p, q in zip(full.parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5)


def test_lr_zero_step_is_bit_exact_restore_in_bf16():
    model = TiedLM().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = ZOSGD(model.parameters(), lr=0.0, eps=1e-2)
    optimizer.step(lambda: lm_loss(model))
    assert optimizer.last_record.scalars[0] != 0.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


class Quadratic(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim, generator=generator, dtype=torch.float64))
        a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        self.register_buffer("a", a @ a.T / dim + torch.eye(dim, dtype=torch.float64))
        self.register_buffer("b", torch.randn(dim, generator=generator, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + self.b @ self.w

    def gradient(self) -> torch.Tensor:
        return self.a @ self.w.detach() + self.b


@pytest.mark.parametrize("one_point", [False, True])
def test_projected_gradient_is_unbiased_on_a_quadratic(one_point):
    dim, samples = 8, 4000
    model = Quadratic(dim)
    optimizer = ZOSGD(model.parameters(), lr=0.0, eps=1e-4, seed=0, one_point=one_point)
    total = torch.zeros(dim, dtype=torch.float64)
    for _ in range(samples):
        estimate = optimizer.estimate(model)
        total += estimate.scalars[0] * optimizer.engine.direction(estimate.seeds[0], 0).double()
        optimizer.step()
    mean, true = total / samples, model.gradient()
    # per-coordinate variance of (g.z) z_j for Gaussian z is |g|^2 + g_j^2
    standard_error = ((true.square().sum() + true.square()) / samples).sqrt()
    assert torch.all((mean - true).abs() < 5 * standard_error), (mean, true)


def test_queries_average_their_directions():
    model = TiedLM()
    optimizer = ZOSGD(model.parameters(), lr=1e-2, queries=3, seed=2)
    expected = [p.detach().clone() for p in model.parameters()]
    optimizer.step(lambda: lm_loss(model))
    record = optimizer.last_record
    for i, reference in enumerate(expected):
        for seed, scalar in zip(record.seeds, record.scalars, strict=True):
            reference -= 1e-2 * scalar / 3 * optimizer.engine.direction(seed, i)
    for p, reference in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), reference, rtol=1e-5, atol=1e-6)
    assert len(set(record.seeds)) == 3


def test_replaying_records_rebuilds_weights_bit_for_bit():
    model, replica = TiedLM(), TiedLM()
    optimizer = ZOSGD(model.parameters(), lr=1e-2, seed=9, weight_decay=0.01)
    records = []
    for step in range(4):
        optimizer.param_groups[0]["lr"] = 1e-2 * (1 - step / 4)
        optimizer.step(lambda: lm_loss(model))
        records.append(StepRecord.from_dict(optimizer.last_record.to_dict()))
    replay = ZOSGD(replica.parameters(), lr=123.0, seed=9)  # lr comes from the records
    for record in records:
        replay.apply_record(record)
    for p, q in zip(model.parameters(), replica.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trip_continues_identically():
    a = TiedLM()
    opt_a = ZOSGD(a.parameters(), lr=1e-2, seed=5)
    for _ in range(2):
        opt_a.step(lambda: lm_loss(a))
    b = copy.deepcopy(a)
    opt_b = ZOSGD(b.parameters(), lr=1e-2, seed=5)
    opt_b.load_state_dict(opt_a.state_dict())
    opt_a.step(lambda: lm_loss(a))
    opt_b.step(lambda: lm_loss(b))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="seed"):
        ZOSGD(TiedLM().parameters(), seed=6).load_state_dict(opt_a.state_dict())


def test_non_finite_loss_is_an_error_not_a_corrupted_model():
    model = TiedLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = ZOSGD(model.parameters())
    with pytest.raises(estimators.NonFiniteLossError, match="non-finite"):
        optimizer.step(lambda: lm_loss(model) * math.nan)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().view(torch.int16 if tensor.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_step_on_a_non_finite_loss_writes_nothing_and_ends_as_a_replayable_skip(dtype):
    """The sync-free step updates before it reads its scalars: with a NaN loss its update runs
    with coefficients (decay 1, c 0) on the device, which leaves every weight bit for bit
    (randn weights hold no -0.0, the one value that ``w + 0`` would turn into +0.0). It then
    raises; ``skip_step`` records the step, and a replay of the records ends on the same bits."""
    model, replica = TiedLM().to(dtype), TiedLM().to(dtype)
    optimizer = ZOSGD(model.parameters(), lr=1e-2, weight_decay=0.1, seed=3)
    calls = []
    update_device = optimizer.engine.update_device
    optimizer.engine.update_device = lambda *a, **k: calls.append(1) or update_device(*a, **k)
    optimizer.step(lambda: lm_loss(model))
    records = [optimizer.last_record]
    before = [_bits(p).clone() for p in model.parameters()]
    with pytest.raises(estimators.NonFiniteLossError, match="non-finite"):
        optimizer.step(lambda: lm_loss(model) * math.nan)
    assert len(calls) == 2  # both steps went through the fused path, the NaN one too
    assert all(torch.equal(_bits(p), b) for p, b in zip(model.parameters(), before, strict=True))
    assert optimizer.step_count == 1
    records.append(optimizer.skip_step("non-finite loss"))
    optimizer.step(lambda: lm_loss(model))
    records.append(optimizer.last_record)
    assert [r.step for r in records] == [0, 1, 2] and records[1].extra == {
        "skipped": "non-finite loss"
    }
    replay = ZOSGD(replica.parameters(), seed=3)
    for record in records:
        replay.apply_record(StepRecord.from_dict(record.to_dict()))
    for p, q in zip(model.parameters(), replica.parameters(), strict=True):
        assert torch.equal(_bits(p), _bits(q))


def test_step_without_estimate_and_bad_hyperparameters():
    optimizer = ZOSGD(TiedLM().parameters())
    with pytest.raises(RuntimeError, match="estimate"):
        optimizer.step()
    with pytest.raises(ValueError, match="eps"):
        ZOSGD(TiedLM().parameters(), eps=0.0)
    with pytest.raises(ValueError, match="queries"):
        ZOSGD(TiedLM().parameters(), queries=0)


def test_registry():
    assert "zo_sgd" in estimators.available_estimators()
    optimizer = estimators.build_estimator("zo_sgd", TiedLM().parameters(), seed=3)
    assert isinstance(optimizer, ZOSGD) and optimizer.run_seed == 3
    with pytest.raises(estimators.UnknownEstimatorError, match="choose one of"):
        estimators.get_estimator("zo_nope")
