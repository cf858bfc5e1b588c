"""ZO-SGD sign / momentum / conservative against naive references written out densely."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

import estimators
import tasks
from estimators import ZOSGD, StepRecord
from estimators.zo_variants import ZOSGDConservative, ZOSGDMomentum, ZOSGDSign
from tests.test_engine import TiedLM
from tests.test_zo_sgd import Quadratic, lm_loss
from zo.engine import EngineConfig
from zo.models import tiny_model

VARIANTS = {"sign": ZOSGDSign, "momentum": ZOSGDMomentum, "conservative": ZOSGDConservative}
SMALL_CHUNKS = EngineConfig(chunk_size=64)  # several chunks per tensor: exercises the seams


def g_hat(engine, seeds, scalars, index: int, scale: float = 1.0) -> torch.Tensor:
    """The ZO gradient of tensor ``index``, materialised: ``scale * mean_q(g_q z_q)``."""
    total = torch.zeros_like(engine.direction(seeds[0], index))
    for seed, scalar in zip(seeds, scalars, strict=True):
        total += scale * scalar / len(seeds) * engine.direction(seed, index)
    return total


def naive_scalars(model: nn.Module, engine, seeds, eps: float, one_point: bool) -> list[float]:
    """Projected gradients from dense copies of the weights moved to W +- eps z."""

    def loss_at(seed: int | None, scale: float) -> float:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for index, param in enumerate(moved.parameters()):
                if seed is not None:
                    param.add_(scale * engine.direction(seed, index))
            return lm_loss(moved).item()

    if one_point:
        base = loss_at(None, 0.0)
        return [(loss_at(seed, eps) - base) / eps for seed in seeds]
    return [(loss_at(seed, eps) - loss_at(seed, -eps)) / (2 * eps) for seed in seeds]


def two_groups(model: TiedLM) -> list[dict]:
    """Two param groups with their own lr and eps (eps ratio 2 scales group 1's direction)."""
    return [
        {"params": [model.embed.weight, model.norm.weight, model.norm.bias]},
        {"params": [model.proj.weight, model.proj.bias], "lr": 3e-3, "eps": 2e-3},
    ]


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------- sign
@pytest.mark.parametrize("one_point", [False, True])
def test_sign_step_matches_naive_sign_sgd(one_point):
    model, reference = TiedLM(), TiedLM()
    lr, eps, wd = 1e-2, 1e-3, 0.5
    optimizer = ZOSGDSign(
        model.parameters(), lr=lr, eps=eps, weight_decay=wd, one_point=one_point, seed=3
    )
    engine = optimizer.engine
    for _ in range(3):
        seeds = optimizer.seeds_for(optimizer.step_count)
        scalars = naive_scalars(reference, engine, seeds, eps, one_point)
        optimizer.step(lambda: lm_loss(model))
        assert optimizer.last_record.scalars == pytest.approx(scalars, rel=1e-3, abs=1e-3)
        with torch.no_grad():
            for index, param in enumerate(reference.parameters()):
                direction = g_hat(engine, seeds, scalars, index).sign()
                param.mul_(1 - lr * wd).sub_(lr * direction)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sign_of_the_query_average_per_group_and_chunk():
    """queries=3, two groups (own lr, eps), 64-element chunks: sign(mean_q g_q z_q) per group."""
    model = TiedLM()
    optimizer = ZOSGDSign(two_groups(model), lr=1e-2, queries=3, seed=5, engine=SMALL_CHUNKS)
    before = weights(model)
    optimizer.step(lambda: lm_loss(model))
    record = optimizer.last_record
    assert len(set(record.seeds)) == 3
    for index, (param, old) in enumerate(zip(model.parameters(), before, strict=True)):
        group = 0 if index < 3 else 1
        scale = optimizer.direction_scale(group)
        step = g_hat(optimizer.engine, record.seeds, record.scalars, index, scale).sign()
        expected = old - record.lrs[group] * step
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7)
        # every entry moved by exactly lr (up to fp32 rounding): it is a sign step
        moved = (param.detach() - old).abs()
        torch.testing.assert_close(moved, torch.full_like(moved, record.lrs[group]))


# ---------------------------------------------------------------------------- momentum
@pytest.mark.parametrize("one_point", [False, True])
def test_momentum_matches_naive_heavy_ball(one_point):
    model = TiedLM()
    lr, beta, wd = 1e-2, 0.8, 0.1
    optimizer = ZOSGDMomentum(
        two_groups(model), lr=lr, momentum=beta, weight_decay=wd, queries=2,
        one_point=one_point, seed=7, engine=SMALL_CHUNKS,
    )  # fmt: skip
    expected = weights(model)
    buffers = [torch.zeros_like(w) for w in expected]
    for step in range(4):
        optimizer.param_groups[0]["lr"] = lr * (1 - step / 8)  # a schedule: lr comes per step
        optimizer.step(lambda: lm_loss(model))
        record = optimizer.last_record
        for index, (w, m) in enumerate(zip(expected, buffers, strict=True)):
            group = 0 if index < 3 else 1
            scale = optimizer.direction_scale(group)
            m.mul_(beta).add_(g_hat(optimizer.engine, record.seeds, record.scalars, index, scale))
            w.mul_(1 - record.lrs[group] * wd).sub_(record.lrs[group] * m)
    for param, w, m in zip(model.parameters(), expected, buffers, strict=True):
        torch.testing.assert_close(param.detach(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.state[param]["momentum_buffer"], m)


def test_momentum_zero_is_zo_sgd():
    a, b = TiedLM(), TiedLM()
    sgd = ZOSGD(a.parameters(), lr=1e-2, weight_decay=0.1, queries=2, seed=1)
    heavy = ZOSGDMomentum(
        b.parameters(), lr=1e-2, momentum=0.0, weight_decay=0.1, queries=2, seed=1
    )
    for _ in range(3):
        sgd.step(lambda: lm_loss(a))
        heavy.step(lambda: lm_loss(b))
    # The same update rounded differently (m = g, then w -= lr * m, vs one fused pass):
    # three steps on a loss of ~5 leave differences of ~1e-5 on weights of ~1e-2.
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5)


def test_momentum_state_is_one_fp32_copy_of_the_trainable_set():
    model = TiedLM().to(torch.bfloat16)
    trainable = [model.proj.weight, model.proj.bias]
    optimizer = ZOSGDMomentum(trainable, lr=1e-2, seed=0)
    optimizer.step(lambda: lm_loss(model))
    buffers = [optimizer.state[p]["momentum_buffer"] for p in trainable]
    assert all(
        b.dtype == torch.float32 and b.shape == p.shape
        for b, p in zip(buffers, trainable, strict=True)
    )
    assert sum(len(s) for s in optimizer.state.values()) == len(trainable)


def test_update_temporaries_are_one_chunk_not_a_tensor():
    model = TiedLM()
    config = EngineConfig(chunk_size=64, threads=1)  # one thread: its buffers are ours to see
    optimizer = ZOSGDMomentum(model.parameters(), lr=1e-2, queries=4, seed=0, engine=config)
    optimizer.step(lambda: lm_loss(model))
    accumulators = list(optimizer._accumulators.__dict__.values())
    assert accumulators and all(a.numel() <= 64 for a in accumulators)
    assert max(p.numel() for p in model.parameters()) > 64


# ---------------------------------------------------------------------------- conservative
def test_conservative_keeps_the_weights_where_zo_sgd_would_raise_the_loss():
    """lr far past 2/L on a quadratic: both moves overshoot, so the plain step hurts."""
    model, plain_model = Quadratic(6), Quadratic(6)
    before = model.w.detach().clone()
    start = model().item()
    conservative = ZOSGDConservative(model.parameters(), lr=5.0, eps=1e-4, seed=0)
    plain = ZOSGD(plain_model.parameters(), lr=5.0, eps=1e-4, seed=0)
    conservative.step(model)
    plain.step(plain_model)
    assert plain_model().item() > start  # ZO-SGD accepted a worse loss
    record = conservative.last_record
    assert record.extra["choice"] == "keep"
    assert record.extra["candidate_losses"]["descend"] == pytest.approx(plain_model().item())
    assert torch.equal(model.w, before)


def test_conservative_takes_the_mirrored_step_when_the_estimate_points_uphill():
    """One-point with a huge eps on a 1-D quadratic: the estimate ``0.5 a eps z^2 + b z``
    is dominated by curvature, so for z < 0 the ZO-SGD step climbs; mirrored, it descends."""
    model = Quadratic(1)
    with torch.no_grad():
        model.w.fill_(0.0)
        model.b.fill_(1e-3)  # slope 1e-3 at w = 0, minimum at w = -1e-3 / a
    optimizer = ZOSGDConservative(model.parameters(), lr=1e-3, eps=1.0, one_point=True, seed=0)
    choices = []
    for _ in range(20):
        start = model().item()
        optimizer.step(model)
        record = optimizer.last_record
        choices.append(record.extra["choice"])
        assert record.extra["candidate_losses"]["keep"] == start  # the one-point L(W)
        assert model().item() <= start
    assert "ascend" in choices
    assert model.w.item() < 0


@pytest.mark.parametrize(
    ("queries", "weight_decay"), [(1, 0.0), (2, 0.0), (1, 0.3)], ids=["perturbed", "q2", "wd"]
)
@pytest.mark.parametrize("lr", [1e-2, 3.0])
def test_conservative_never_ends_on_a_worse_loss_and_scores_what_it_applies(
    queries, weight_decay, lr
):
    model = TiedLM()
    optimizer = ZOSGDConservative(
        two_groups(model), lr=lr, weight_decay=weight_decay, queries=queries, seed=2,
        engine=SMALL_CHUNKS,
    )  # fmt: skip
    choices = set()
    for _ in range(16):  # at lr=3 most estimates overshoot: "keep" is the usual choice
        start = lm_loss(model).item()
        optimizer.step(lambda: lm_loss(model))
        extra = optimizer.last_record.extra
        choices.add(extra["choice"])
        after = lm_loss(model).item()
        assert after <= start
        # the candidate was evaluated on exactly the weights that were then kept
        assert extra["candidate_losses"][extra["choice"]] == after
        assert extra["candidate_losses"]["keep"] == start
    if lr < 1:
        assert choices != {"keep"}  # it did move
    else:  # every step overshoots (losses ~20x the start's): refusing them is the point
        assert "keep" in choices


def test_conservative_split_form_scores_candidates_on_the_same_micro_batches():
    ids = torch.randint(0, 40, (6, 5), generator=torch.Generator().manual_seed(0))
    parts = ids.split(2)
    model = TiedLM()
    optimizer = ZOSGDConservative(model.parameters(), lr=0.05, seed=4)
    for _ in range(3):
        start = sum(lm_loss(model, part).item() for part in parts) / len(parts)
        for part in parts:
            optimizer.estimate(lambda part=part: lm_loss(model, part))
        optimizer.step()
        after = sum(lm_loss(model, part).item() for part in parts) / len(parts)
        losses = optimizer.last_record.extra["candidate_losses"]
        assert losses["keep"] == pytest.approx(start, rel=1e-6)
        assert losses[optimizer.last_record.extra["choice"]] == pytest.approx(after, rel=1e-6)
        assert after <= start + 1e-6


def test_conservative_replay_needs_the_choice():
    optimizer = ZOSGDConservative(TiedLM().parameters(), seed=0)
    record = StepRecord(0, optimizer.seeds_for(0), [1.0], [1e-3], [0.0], 1.0)
    with pytest.raises(ValueError, match="choice"):
        optimizer.apply_record(record)


# ---------------------------------------------------------------------------- shared
def _build(name: str, model: TiedLM) -> estimators.ZOOptimizer:
    return VARIANTS[name](
        two_groups(model), lr=1e-2, weight_decay=0.05, queries=2, seed=9, engine=SMALL_CHUNKS
    )


def _train(name: str, model: TiedLM, steps: int) -> tuple:
    optimizer = _build(name, model)
    records = []
    for step in range(steps):
        optimizer.param_groups[1]["lr"] = 3e-3 * (1 - step / 8)
        optimizer.step(lambda: lm_loss(model))
        records.append(json.loads(json.dumps(optimizer.last_record.to_dict())))
    return optimizer, records


@pytest.mark.parametrize("name", VARIANTS)
def test_replaying_records_rebuilds_weights_and_state_bit_for_bit(name):
    model, replica = TiedLM(), TiedLM()
    optimizer, records = _train(name, model, 4)
    replay = VARIANTS[name](two_groups(replica), lr=7.0, seed=9, engine=SMALL_CHUNKS)
    for data in records:
        replay.apply_record(StepRecord.from_dict(data))
    assert_same(model, replica)
    for p, q in zip(model.parameters(), replica.parameters(), strict=True):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, replay.state[q][key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", VARIANTS)
def test_resume_from_a_saved_state_continues_bit_for_bit(name, dtype):
    model = TiedLM().to(dtype)
    optimizer, _ = _train(name, model, 2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed = _build(name, resumed_model)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(2):
        optimizer.step(lambda: lm_loss(model))
        resumed.step(lambda: lm_loss(resumed_model))
    assert_same(model, resumed_model)
    for state in resumed.state.values():
        assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("name", VARIANTS)
def test_step_with_closure_equals_estimate_then_step(name):
    a, b = TiedLM(), TiedLM()
    opt_a = VARIANTS[name](a.parameters(), lr=1e-2, queries=2, seed=1)
    opt_b = VARIANTS[name](b.parameters(), lr=1e-2, queries=2, seed=1)
    for _ in range(3):
        loss_a = opt_a.step(lambda: lm_loss(a))
        opt_b.estimate(lambda: lm_loss(b))
        loss_b = opt_b.step()
        assert loss_a == loss_b and opt_a.last_record == opt_b.last_record
    assert_same(a, b)


@pytest.mark.parametrize("name", ["zo_sgd_sign", "zo_sgd_momentum", "zo_sgd_conservative"])
def test_registered_with_a_documented_config(name):
    spec = estimators.get_estimator(name)
    assert spec.traits.zeroth_order and spec.traits.grad_accum
    optimizer = estimators.build_estimator(name, TiedLM().named_parameters(), seed=3)
    assert isinstance(optimizer, spec.impl) and optimizer.run_seed == 3
    with pytest.raises(ValueError, match="momentum"):
        ZOSGDMomentum(TiedLM().parameters(), momentum=1.0)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tiny_lm_steps_move_only_the_trainable_tensors(family):
    model, tokenizer = tiny_model(family)
    task = tasks.get_task("sentiment")
    batch = tasks.encode_candidates(tokenizer, task, task.load("train")[:4], max_length=64)
    named = [(n, p) for n, p in model.named_parameters() if "layers.1." in n]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ["zo_sgd_sign", "zo_sgd_momentum", "zo_sgd_conservative"]:
        optimizer = estimators.build_estimator(name, named, lr=1e-3, seed=0)
        for _ in range(2):
            loss = optimizer.step(lambda: tasks.classification_loss(model, batch))
            assert torch.isfinite(torch.tensor(loss))
    trainable = {n for n, _ in named}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
