"""Forward gradient against references: autograd directional derivatives (HF models, 4-bit
layers), unbiasedness on a quadratic, a naive step, replay, resume, and its clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import estimators
from estimators import StepRecord
from estimators.forward_grad import ForwardGrad
from tests.test_engine import TiedLM
from tests.test_zo_sgd import Quadratic, lm_loss
from zo.jvp import ForwardADError, forward_ad_safe
from zo.models import tiny_model

IDS = torch.tensor([[1, 70, 71, 72, 73, 74, 2], [1, 80, 81, 82, 2, 0, 0]])
MASK = (IDS != 0).long()


def hf_loss(model: nn.Module) -> torch.Tensor:
    """Next-token cross-entropy over the unpadded positions (masks and padding exercised)."""
    logits = model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits[:, :-1]
    targets = IDS[:, 1:].masked_fill(MASK[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def autograd_projections(params, loss_fn, engine, seeds) -> list[float]:
    """``grad . v`` per seed, the gradient from backward and v from the same engine."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params)
    return [
        sum(
            float((g.double() * engine.direction(seed, i).double()).sum())
            for i, g in enumerate(grads)
        )
        for seed in seeds
    ]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_directional_derivatives_equal_autograd_on_tiny_hf_models(family):
    model, _ = tiny_model(family, attn="eager")
    named = list(model.named_parameters())  # tied embedding/head: one tensor, two uses
    optimizer = ForwardGrad(named, lr=0.0, queries=2, seed=3)
    estimate = optimizer.estimate(lambda: hf_loss(model))
    expected = autograd_projections(
        [p for _, p in named], lambda: hf_loss(model), optimizer.engine, estimate.seeds
    )
    assert estimate.scalars == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert estimate.loss == pytest.approx(float(hf_loss(model).detach()), rel=1e-6)


# ---------------------------------------------------------------------------- 4-bit layers
bnb = pytest.importorskip("bitsandbytes")


class FourBitNet(nn.Module):
    """Trainable fp32 layer, then a frozen NF4 layer with a trainable bias, then a loss."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.pre = nn.Linear(8, 64)
        dense = nn.Linear(64, 32)
        with torch.no_grad():
            for p in [*self.pre.parameters(), *dense.parameters()]:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.quant = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        self.quant.load_state_dict(dense.state_dict())
        self.quant.to("cpu")  # quantizes the weight to NF4
        self.quant.weight.requires_grad_(False)
        self.x = torch.randn(5, 8, generator=generator)

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.quant(torch.tanh(self.pre(self.x)))).square().mean()


def test_directional_derivative_through_a_4bit_layer_equals_autograd():
    model = FourBitNet()
    assert model.quant.weight.dtype == torch.uint8  # really quantized
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    optimizer = ForwardGrad(named, lr=0.0, queries=3, seed=1)
    estimate = optimizer.estimate(model)
    # the reference differentiates through bitsandbytes' own backward
    expected = autograd_projections([p for _, p in named], model, optimizer.engine, estimate.seeds)
    assert estimate.scalars == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert all(s != 0.0 for s in estimate.scalars)


def test_4bit_layers_run_the_dequantizing_forward_only_inside_the_context():
    layer = FourBitNet().quant
    original = type(layer).forward
    x = torch.randn(3, 64)
    with forward_ad_safe():
        assert type(layer).forward is not original
        patched = layer(x)
    assert type(layer).forward is original
    torch.testing.assert_close(patched, layer(x), rtol=1e-5, atol=1e-5)


class Int8Layer(nn.Module):
    """A quantized layer with no forward-AD rule registered."""

    def __init__(self):
        super().__init__()
        self.q = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.q.float()


def test_an_unregistered_quantized_layer_on_the_tangent_path_is_an_error():
    pre, quant = nn.Linear(4, 4), Int8Layer()
    x = torch.randn(2, 4)
    optimizer = ForwardGrad(pre.parameters(), lr=0.0)
    with pytest.raises(ForwardADError, match="register_jvp_forward"):
        optimizer.estimate(lambda: quant(pre(x)).sum())
    # before every trainable tensor it receives no tangent and cannot drop one: allowed
    post = nn.Linear(4, 1)
    optimizer = ForwardGrad(post.parameters(), lr=0.0)
    assert optimizer.estimate(lambda: post(quant(x)).sum()).scalars[0] != 0.0


# ---------------------------------------------------------------------------- estimator
def test_projected_gradient_is_exact_and_unbiased_on_a_quadratic():
    dim, samples = 8, 3000
    model = Quadratic(dim)
    optimizer = ForwardGrad(model.parameters(), lr=0.0, seed=0)
    true = model.gradient()
    total = torch.zeros(dim, dtype=torch.float64)
    for _ in range(samples):
        estimate = optimizer.estimate(model)
        z = optimizer.engine.direction(estimate.seeds[0], 0).double()
        assert estimate.scalars[0] == pytest.approx(float(true @ z), rel=1e-9, abs=1e-12)
        total += estimate.scalars[0] * z
        optimizer.step()
    mean = total / samples
    # per-coordinate variance of (g.z) z_j for Gaussian z is |g|^2 + g_j^2
    standard_error = ((true.square().sum() + true.square()) / samples).sqrt()
    assert torch.all((mean - true).abs() < 5 * standard_error), (mean, true)


def test_step_matches_a_naive_forward_gradient_step():
    model, reference = TiedLM(), TiedLM()
    lr, wd = 1e-2, 0.1
    optimizer = ForwardGrad(model.parameters(), lr=lr, weight_decay=wd, queries=2, seed=4)
    optimizer.step(lambda: lm_loss(model))
    record = optimizer.last_record
    params = list(reference.parameters())
    grads = torch.autograd.grad(lm_loss(reference), params)
    directions = [
        [optimizer.engine.direction(s, i) for i in range(len(params))] for s in record.seeds
    ]
    projections = [
        sum(float((g * z).sum()) for g, z in zip(grads, zs, strict=True)) for zs in directions
    ]
    with torch.no_grad():
        for i, p in enumerate(params):
            terms = zip(projections, directions, strict=True)
            step = sum(g_v * zs[i] for g_v, zs in terms) / len(projections)
            p.sub_(lr * (step + wd * p))
    assert record.scalars == pytest.approx(projections, rel=1e-4)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulated_micro_batches_average_their_derivatives():
    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    full, micro = TiedLM(), TiedLM()
    opt_full = ForwardGrad(full.parameters(), lr=1e-2, seed=3)
    opt_micro = ForwardGrad(micro.parameters(), lr=1e-2, seed=3)
    opt_full.step(lambda: lm_loss(full, ids))
    for part in ids.split(2):
        opt_micro.estimate(lambda part=part: lm_loss(micro, part))
    opt_micro.step()
    assert opt_micro.last_record.scalars[0] == pytest.approx(
        opt_full.last_record.scalars[0], rel=1e-5
    )


def test_replaying_records_rebuilds_weights_bit_for_bit():
    model, replica = TiedLM(), TiedLM()
    optimizer = ForwardGrad(model.parameters(), lr=1e-2, weight_decay=0.01, queries=2, seed=9)
    records = []
    for step in range(3):
        optimizer.param_groups[0]["lr"] = 1e-2 * (1 - step / 3)
        optimizer.step(lambda: lm_loss(model))
        records.append(StepRecord.from_dict(optimizer.last_record.to_dict()))
    replay = ForwardGrad(replica.parameters(), lr=5.0, queries=2, seed=9)  # lr from records
    for record in records:
        replay.apply_record(record)
    for p, q in zip(model.parameters(), replica.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trip_continues_identically():
    a = TiedLM()
    opt_a = ForwardGrad(a.parameters(), lr=1e-2, seed=5)
    for _ in range(2):
        opt_a.step(lambda: lm_loss(a))
    b = copy.deepcopy(a)
    opt_b = ForwardGrad(b.parameters(), lr=1e-2, seed=5)
    opt_b.load_state_dict(opt_a.state_dict())
    for _ in range(2):
        opt_a.step(lambda: lm_loss(a))
        opt_b.step(lambda: lm_loss(b))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_weights_are_untouched_by_an_estimate_and_lr_zero_step():
    model = TiedLM().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = ForwardGrad(model.parameters(), lr=0.0)
    optimizer.step(lambda: lm_loss(model))
    assert optimizer.last_record.scalars[0] != 0.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------- errors
def test_sdpa_attention_is_a_clear_error():
    model, _ = tiny_model("llama", attn="sdpa")
    optimizer = ForwardGrad(model.parameters(), lr=0.0)
    with pytest.raises(ForwardADError, match="eager"):
        optimizer.estimate(lambda: hf_loss(model))


def test_a_loss_without_a_tangent_is_an_error_not_a_zero():
    model = TiedLM()
    optimizer = ForwardGrad(model.parameters(), lr=0.0)
    with pytest.raises(ForwardADError, match="dropped"):
        optimizer.estimate(lambda: torch.tensor(lm_loss(model).item()))
    with pytest.raises(ForwardADError, match="one-element tensor"):
        optimizer.estimate(lambda: lm_loss(model).item())
    other = TiedLM(seed=1)  # trainable tensors that the closure never reads
    with pytest.raises(ForwardADError, match="no module read"):
        optimizer.estimate(lambda: lm_loss(other))


def test_registered_as_a_seed_replayable_eager_attention_estimator():
    spec = estimators.get_estimator("forward_grad")
    assert spec.traits.zeroth_order and spec.traits.eager_attention and spec.traits.grad_accum
    optimizer = estimators.build_estimator("forward_grad", TiedLM().named_parameters(), seed=3)
    assert isinstance(optimizer, ForwardGrad) and optimizer.run_seed == 3
    with pytest.raises(ValueError, match="queries"):
        ForwardGrad(TiedLM().parameters(), queries=0)
