"""LOMO against references: plain SGD, clip_grad_norm_/clip_grad_value_ + SGD, a naive
fp16 loss-scaled step, checkpointed = plain, one gradient alive, resume = uninterrupted."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import estimators
import tasks
from estimators.lomo import LOMO, GradientOverflowError
from tests.test_engine import TiedLM
from tests.test_zo_sgd import lm_loss
from zo.models import tiny_model


def sentiment_batches(tokenizer, count: int, size: int = 4) -> list:
    task = tasks.get_task("sentiment")
    examples = task.load("train")
    return [
        tasks.encode_candidates(tokenizer, task, examples[i * size : (i + 1) * size], 64)
        for i in range(count)
    ]


def random_ids(steps: int, batch: int = 2, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 260, (batch, length), generator=generator) for _ in range(steps)]


def hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def sgd_reference_steps(
    model: nn.Module, closures, lr: float, weight_decay: float = 0.0, clip=None
):
    """Plain torch.optim.SGD on ``model``; ``clip(params)`` runs between backward and step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    for closure in closures:
        optimizer.zero_grad(set_to_none=True)
        closure(model).backward()
        if clip is not None:
            clip(list(model.parameters()))
        optimizer.step()


def assert_params_close(a: nn.Module, b: nn.Module, **tolerance) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_equals_plain_sgd_on_tiny_models_with_tied_embeddings(family):
    model, tokenizer = tiny_model(family)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    batches = sentiment_batches(tokenizer, 3)
    optimizer = estimators.build_estimator(
        "lomo",
        list(model.named_parameters()),
        estimators.lomo.LOMOConfig(lr=0.05, weight_decay=0.1),
    )
    for batch in batches:
        optimizer.step(lambda batch=batch: tasks.classification_loss(model, batch))
    closures = [lambda m, batch=batch: tasks.classification_loss(m, batch) for batch in batches]
    sgd_reference_steps(reference, closures, lr=0.05, weight_decay=0.1)
    assert_params_close(model, reference, rtol=1e-5, atol=1e-6)
    moved = model.get_input_embeddings().weight - start.get_input_embeddings().weight
    assert moved.abs().max() > 1e-4  # the tied weight trained
    assert all(p.grad is None for p in model.parameters())


def test_tied_weight_gets_one_update_with_the_summed_gradient():
    model, reference = TiedLM(), TiedLM()
    grads = torch.autograd.grad(lm_loss(reference), list(reference.parameters()))
    optimizer = LOMO(model.parameters(), lr=0.1)
    calls: list[int] = []
    update = optimizer._update

    def counting_update(group, param):
        calls.append(id(param))
        update(group, param)

    optimizer._update = counting_update
    optimizer.step(lambda: lm_loss(model))
    assert sorted(calls) == sorted(id(p) for p in model.parameters())  # each tensor once
    for p, q, g in zip(model.parameters(), reference.parameters(), grads, strict=True):
        torch.testing.assert_close(p, q - 0.1 * g, rtol=1e-6, atol=1e-7)


def gradients_alive_per_hook(model: nn.Module, run) -> list[int]:
    """How many tensors hold a .grad each time one tensor's gradient completes.

    The test's hooks are registered first, so they run before LOMO's hook on that tensor.
    """
    params = list(model.parameters())
    counts: list[int] = []
    handles = [
        p.register_post_accumulate_grad_hook(
            lambda _: counts.append(sum(q.grad is not None for q in params))
        )
        for p in params
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize("clip_grad_norm", [None, 1.0])
def test_at_most_one_gradient_is_alive(clip_grad_norm):
    model, _ = tiny_model("llama")
    ids = random_ids(1)[0]
    optimizer = LOMO(model.parameters(), lr=1e-3, clip_grad_norm=clip_grad_norm)
    counts = gradients_alive_per_hook(model, lambda: optimizer.step(lambda: hf_loss(model, ids)))
    passes = 2 if clip_grad_norm else 1
    assert len(counts) == passes * len(list(model.parameters()))
    assert set(counts) == {1}
    # the counter does see gradients pile up in a plain backward
    plain = gradients_alive_per_hook(model, lambda: hf_loss(model, ids).backward())
    assert max(plain) == len(list(model.parameters()))


def enable_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    model.train()  # transformers checkpoints only in training mode (tiny models: no dropout)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("clip_grad_norm", [None, 0.5])
def test_gradient_checkpointing_equals_no_checkpointing(family, clip_grad_norm):
    plain, _ = tiny_model(family)
    checkpointed = copy.deepcopy(plain)
    plain.train()
    enable_checkpointing(checkpointed)
    linear_calls = []
    first_layer = next(m for m in checkpointed.modules() if isinstance(m, nn.Linear))
    first_layer.register_forward_hook(lambda *_: linear_calls.append(1))
    batches = random_ids(3)
    for model in (plain, checkpointed):
        optimizer = LOMO(model.parameters(), lr=0.05, clip_grad_norm=clip_grad_norm)
        for ids in batches:
            optimizer.step(lambda ids=ids, model=model: hf_loss(model, ids))
    # forward + one recompute per backward pass
    assert len(linear_calls) == len(batches) * (1 + (2 if clip_grad_norm else 1))
    assert_params_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_grad_norm_clipping_equals_clip_grad_norm_then_sgd():
    model, _ = tiny_model("llama")
    reference = copy.deepcopy(model)
    batches = random_ids(3)
    optimizer = LOMO(model.parameters(), lr=0.05, clip_grad_norm=0.3)
    norms = []
    for ids in batches:
        optimizer.step(lambda ids=ids: hf_loss(model, ids))
        norms.append(optimizer.last_grad_norm)
    reference_norms = []

    def clip(params):
        reference_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.3)))

    closures = [lambda m, ids=ids: hf_loss(m, ids) for ids in batches]
    sgd_reference_steps(reference, closures, lr=0.05, clip=clip)
    assert min(reference_norms) > 0.3  # clipping was active on every step
    assert norms == pytest.approx(reference_norms, rel=1e-5)
    assert_params_close(model, reference, rtol=1e-5, atol=1e-6)


def test_value_clipping_equals_clamp_then_sgd_and_comes_before_the_norm():
    batches = random_ids(2)
    for norm in (None, 0.05):
        model, _ = tiny_model("opt")
        reference = copy.deepcopy(model)
        optimizer = LOMO(model.parameters(), lr=0.05, clip_grad_value=2e-3, clip_grad_norm=norm)
        for ids in batches:
            optimizer.step(lambda ids=ids, model=model: hf_loss(model, ids))
        clipped: list[float] = []

        def clip(params, norm=norm, clipped=clipped):
            clipped.append(max(float(p.grad.abs().max()) for p in params))
            torch.nn.utils.clip_grad_value_(params, 2e-3)
            if norm is not None:
                assert float(torch.nn.utils.clip_grad_norm_(params, norm)) > norm

        closures = [lambda m, ids=ids: hf_loss(m, ids) for ids in batches]
        sgd_reference_steps(reference, closures, lr=0.05, clip=clip)
        assert min(clipped) > 2e-3  # some entries were clamped
        assert_params_close(model, reference, rtol=1e-5, atol=1e-6)


def naive_fp16_scaled_step(model: nn.Module, scale: float, lr: float) -> None:
    """Loss scaling written out: backward of scale*loss, unscale and update in fp32."""
    model.zero_grad(set_to_none=True)
    (lm_loss(model).float() * scale).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.float().add(p.grad.float() / scale, alpha=-lr).half())
    model.zero_grad(set_to_none=True)


def test_fp16_loss_scaling_matches_a_naive_scaled_step_and_grows_the_scale():
    model, reference = TiedLM().half(), TiedLM().half()
    optimizer = LOMO(model.parameters(), lr=0.05, initial_loss_scale=256.0, loss_scale_window=2)
    assert optimizer.scaler is not None  # "auto" turned it on for fp16
    scales = []
    for _ in range(3):
        scales.append(optimizer.scaler.scale)
        optimizer.step(lambda: lm_loss(model))
        naive_fp16_scaled_step(reference, scales[-1], 0.05)
        assert not optimizer.last_step_skipped
    assert scales == [256.0, 256.0, 512.0]
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


class LateFiniteEarlyOverflow(nn.Module):
    """loss = sum(b * (a * x)): b's gradient (a x) is small and completes first in backward,
    a's (b x = 1e5 * loss scale) overflows fp16 (max 65504) unless the scale is below 0.65."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.full((4,), 1e-3, dtype=torch.float16))
        self.b = nn.Parameter(torch.full((4,), 1e3, dtype=torch.float16))

    def forward(self) -> torch.Tensor:
        x = torch.full((4,), 100.0, dtype=torch.float16)
        return (self.b * (self.a * x)).float().sum()


def test_overflow_skips_the_whole_step_and_halves_the_scale():
    model = LateFiniteEarlyOverflow()
    start = copy.deepcopy(model)
    optimizer = LOMO(model.parameters(), lr=1e-9, initial_loss_scale=2.0, min_loss_scale=0.25)
    for expected_scale in (1.0, 0.5):
        loss = optimizer.step(model)
        assert optimizer.last_step_skipped and optimizer.scaler.scale == expected_scale
        assert loss == pytest.approx(400.0, rel=1e-3)  # 4 * 1e3 * 1e-3 * 100, reported unscaled
        # b's gradient was finite and complete before a's overflowed: still untouched
        assert torch.equal(model.a, start.a) and torch.equal(model.b, start.b)
    assert optimizer.scaler.skipped_steps == 2
    optimizer.step(model)  # at scale 0.5, a's scaled gradient (5e4) fits in fp16
    assert not optimizer.last_step_skipped
    expected_a = (start.a.float() - 1e-9 * 1e5).half()
    expected_b = (start.b.float() - 1e-9 * 0.1).half()
    assert torch.equal(model.a, expected_a) and torch.equal(model.b, expected_b)
    assert optimizer.last_grad_norm == pytest.approx(2e5, rel=1e-3)  # |(1e5,) * 4| = 2e5


def test_overflow_at_the_minimum_scale_is_an_error_and_changes_nothing():
    model = LateFiniteEarlyOverflow()
    start = copy.deepcopy(model)
    optimizer = LOMO(model.parameters(), lr=1e-9, initial_loss_scale=2.0, min_loss_scale=1.0)
    optimizer.step(model)
    with pytest.raises(GradientOverflowError, match="minimum loss scale"):
        optimizer.step(model)
    assert torch.equal(model.a, start.a) and torch.equal(model.b, start.b)


def test_bf16_update_is_computed_in_fp32_and_rounded_once():
    model = TiedLM().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    grads = torch.autograd.grad(lm_loss(reference), list(reference.parameters()))
    LOMO(model.parameters(), lr=0.03, weight_decay=0.5).step(lambda: lm_loss(model))
    for p, q, g in zip(model.parameters(), reference.parameters(), grads, strict=True):
        w = q.float()
        assert torch.equal(p, (w - 0.03 * (g.float() + 0.5 * w)).to(torch.bfloat16))


def test_split_api_and_its_errors():
    a, b = TiedLM(), TiedLM()
    opt_a, opt_b = LOMO(a.parameters(), lr=0.1), LOMO(b.parameters(), lr=0.1)
    for _ in range(2):
        loss_a = opt_a.step(lambda: lm_loss(a))
        estimate = opt_b.estimate(lambda: lm_loss(b))
        assert opt_b.step() == loss_a == estimate.loss
        assert estimate.seeds == estimate.scalars == []  # a gradient, not seeds and scalars
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt_a.last_record is None and opt_a.step_count == 2
    opt_a.estimate(lambda: lm_loss(a))
    with pytest.raises(RuntimeError, match="cannot accumulate"):
        opt_a.estimate(lambda: lm_loss(a))
    opt_a.step()
    with pytest.raises(RuntimeError, match="needs an estimate"):
        opt_a.step()
    spec = estimators.get_estimator("lomo")
    assert not spec.traits.zeroth_order and not spec.traits.grad_accum


def test_hooks_are_gone_after_a_step():
    model = TiedLM()
    optimizer = LOMO(model.parameters(), lr=0.1)
    optimizer.step(lambda: lm_loss(model))
    before = [p.detach().clone() for p in model.parameters()]
    lm_loss(model).backward()  # an unrelated backward must not update anything
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q) and p.grad is not None


def test_bad_inputs_name_the_problem():
    model = TiedLM()
    model.proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="proj.weight has requires_grad=False"):
        LOMO(list(model.named_parameters()))
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0"):
        LOMO(TiedLM().parameters(), clip_grad_norm=0.0)
    model = TiedLM()
    optimizer = LOMO(model.parameters())

    def loss_without_graph():
        with torch.no_grad():
            return lm_loss(model)

    with pytest.raises(ValueError, match="does not require grad"):
        optimizer.estimate(loss_without_graph)
    with pytest.raises(estimators.NonFiniteLossError):
        LOMO(model.parameters()).estimate(lambda: lm_loss(model) * float("inf"))


def test_state_dict_resume_equals_uninterrupted():
    """fp16 with a loss scale that grows every 2 steps: the scaler state must survive."""

    def make(model):
        return LOMO(model.parameters(), lr=0.05, initial_loss_scale=64.0, loss_scale_window=2)

    ids = torch.randint(0, 40, (4, 2, 6), generator=torch.Generator().manual_seed(5))
    straight = TiedLM().half()
    opt_straight = make(straight)
    for step in range(4):
        opt_straight.step(lambda step=step: lm_loss(straight, ids[step]))

    first = TiedLM().half()
    opt_first = make(first)
    for step in range(2):
        opt_first.step(lambda step=step: lm_loss(first, ids[step]))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = TiedLM(seed=9).half()
    resumed.load_state_dict(saved["model"])
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(saved["optimizer"])
    assert opt_resumed.scaler.scale == 128.0 and opt_resumed.step_count == 2
    for step in range(2, 4):
        opt_resumed.step(lambda step=step: lm_loss(resumed, ids[step]))
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt_resumed.scaler == opt_straight.scaler

    fp32 = LOMO(TiedLM().parameters())  # no scaler: a scaled run's state does not fit
    with pytest.raises(ValueError, match="loss scaling"):
        fp32.load_state_dict(saved["optimizer"])
