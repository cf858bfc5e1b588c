"""Block-wise ZO against references: a naive per-block MeZO step, reuse off, autograd."""

from __future__ import annotations

import fnmatch
import io

import pytest
import torch
from torch import nn

import estimators
import tasks
from estimators.block_zo import (
    ORDERS,
    OUTSIDE,
    BlockZO,
    BlockZOConfig,
    PrefixReplayError,
)
from zo.blocks import NoBlocksError, checkpoint_blocks, decoder_blocks
from zo.models import FAMILIES, tiny_model

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))


def lm_loss(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    logits = model(input_ids=ids[:, :-1]).logits.float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _build(family: str = "llama", groups=None, **options) -> tuple[nn.Module, BlockZO]:
    model, _ = tiny_model(family)
    params = groups(model) if groups else list(model.named_parameters())
    options = {"lr": 1e-2, "eps": 1e-3, "seed": 5, **options}
    return model, estimators.build_estimator("block_zo", params, model=model, **options)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _names(optimizer: BlockZO) -> list[str]:
    return [n for group in optimizer.param_groups for n in group["param_names"]]


def _unit_names(optimizer: BlockZO, step: int) -> set[str]:
    names = _names(optimizer)
    return {names[i] for indices in optimizer.unit_at(step).groups.values() for i in indices}


# ---------------------------------------------------------------------------- units
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_units_are_the_blocks_in_order_then_the_tensors_outside_them(family: str) -> None:
    model, optimizer = _build(family)
    block_names = {id(m): n for n, m in model.named_modules()}
    expected = [block_names[id(b)] for b in decoder_blocks(model)] + [OUTSIDE]
    assert [unit.name for unit in optimizer.units] == expected
    for unit in optimizer.units[:-1]:
        assert all(n.startswith(unit.name + ".") for n in _unit_names(optimizer, unit.block))
    outside = {n for n in _names(optimizer) if ".layers." not in n}
    assert _unit_names(optimizer, len(optimizer.units) - 1) == outside  # cycle: last is outside


def test_blocks_without_trainable_tensors_are_not_visited() -> None:
    model, optimizer = _build(
        groups=lambda m: [(n, p) for n, p in m.named_parameters() if ".layers.1." in n]
    )
    assert [unit.name for unit in optimizer.units] == ["model.layers.1"]


def test_a_tensor_shared_by_two_blocks_belongs_to_the_outside_unit() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
            self.layers[2].weight = self.layers[0].weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x.square().sum()

    model = Shared()
    optimizer = BlockZO(model.parameters(), model=model)
    members = [sorted(i for g in unit.groups.values() for i in g) for unit in optimizer.units]
    # parameters(): 0 shared weight, 1 bias0, 2 weight1, 3 bias1, 4 bias2
    assert [unit.name for unit in optimizer.units] == ["layers.0", "layers.1", "layers.2", OUTSIDE]
    assert members == [[1], [2, 3], [4], [0]]


def test_a_model_without_blocks_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(NoBlocksError, match="block_zo: .*no nn.ModuleList.*use zo_sgd"):
        estimators.build_estimator("block_zo", model.parameters(), model=model)


def test_an_unknown_order_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"order 'zigzag' is unknown; choose one of \['cycle'"):
        BlockZOConfig(order="zigzag")


# ---------------------------------------------------------------------------- orders
def test_cycle_visits_every_block_in_forward_order() -> None:
    _, optimizer = _build()
    count = len(optimizer.units)
    assert [optimizer.unit_position(step) for step in range(2 * count)] == 2 * list(range(count))


def test_shuffle_visits_every_block_once_per_round_and_random_is_seeded() -> None:
    count, seed = 7, 3
    for start in range(0, 5 * count, count):
        visited = [ORDERS["shuffle"](step, count, seed) for step in range(start, start + count)]
        assert sorted(visited) == list(range(count))
    draws = [ORDERS["random"](step, count, seed) for step in range(200)]
    assert draws == [ORDERS["random"](step, count, seed) for step in range(200)]
    assert set(draws) == set(range(count))
    assert draws != [ORDERS["random"](step, count, seed + 1) for step in range(200)]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_only_the_chosen_block_changes_at_each_step(family: str, order: str) -> None:
    model, optimizer = _build(family, order=order)
    for step in range(len(optimizer.units) + 1):
        before = _snapshot(model)
        optimizer.step(lambda: lm_loss(model))
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == _unit_names(optimizer, step)
        assert optimizer.last_record.extra["block"] == optimizer.unit_position(step)


# ---------------------------------------------------------------------------- references
def naive_block_step(model, engine, seed, chosen, eps_ref, decays) -> float:
    """MeZO on one block, written out densely: W +- eps_g z by hand, difference, update.

    ``chosen`` lists ``(name, engine index, lr, eps)`` of the block's tensors.
    """
    params = dict(model.named_parameters())
    z = {name: engine.direction(seed, index) for name, index, _, _ in chosen}
    with torch.no_grad():
        for name, _, _, eps in chosen:
            params[name].add_(eps * z[name])
        plus = lm_loss(model).item()
        for name, _, _, eps in chosen:
            params[name].sub_(2 * eps * z[name])
        minus = lm_loss(model).item()
        for name, _, _, eps in chosen:
            params[name].add_(eps * z[name])
        grad = (plus - minus) / (2 * eps_ref)
        for name, _, lr, eps in chosen:
            params[name].mul_(decays.get(name, 1.0)).sub_(lr * (eps / eps_ref) * grad * z[name])
    return grad


def _check_against_naive(family: str, groups=None, steps: int = 3, **options) -> BlockZO:
    model, optimizer = _build(family, groups, **options)
    reference, _ = tiny_model(family)
    names = _names(optimizer)
    for step in range(steps):
        unit = optimizer.unit_at(step)
        chosen, decays = [], {}
        for g, indices in unit.groups.items():
            group = optimizer.param_groups[g]
            for i in indices:
                chosen.append((names[i], i, group["lr"], group["eps"]))
                decays[names[i]] = 1.0 - group["lr"] * group["weight_decay"]
        eps_ref = optimizer.param_groups[unit.reference_group]["eps"]
        seed = optimizer.seeds_for(step)[0]
        grad = naive_block_step(reference, optimizer.engine, seed, chosen, eps_ref, decays)
        optimizer.step(lambda: lm_loss(model))
        assert optimizer.last_record.scalars[0] == pytest.approx(grad, rel=1e-3, abs=1e-3)
        for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"step {step}: {n}")
        with torch.no_grad():  # restart the reference from the estimator's weights
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                q.copy_(p)
    return optimizer


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_matches_a_naive_per_block_mezo_step(family: str) -> None:
    # eps 1e-2: the reference's in-place +-eps rounds; a larger eps keeps that noise small
    _check_against_naive(family, weight_decay=0.1, eps=1e-2)


def _per_group(model: nn.Module) -> list[dict]:
    """Block 0 at its own lr/eps, block 1's attention and the rest of it apart, then the rest."""
    patterns = [
        ("*.layers.0.*", {"lr": 3e-2, "eps": 2e-2}),
        ("*.layers.1.self_attn.*", {"lr": 5e-3, "eps": 5e-3, "weight_decay": 0.5}),
        ("*.layers.1.*", {"lr": 2e-2, "eps": 1e-2}),
        ("*", {}),
    ]
    groups, taken = [], set()
    for pattern, settings in patterns:
        members = [
            (n, p)
            for n, p in model.named_parameters()
            if n not in taken and fnmatch.fnmatchcase(n, pattern)
        ]
        taken |= {n for n, _ in members}
        groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members]})
        groups[-1].update(settings)
    return groups


def test_per_group_lr_and_eps_are_honoured() -> None:
    optimizer = _check_against_naive("llama", groups=_per_group, steps=3, lr=1e-2, eps=4e-2)
    assert sorted(optimizer.units[1].groups) == [1, 2]  # block 1 spans two groups
    assert optimizer.last_record.extra["eps"] == [2e-2, 5e-3, 1e-2, 4e-2]


class Chain(nn.Module):
    """Three tanh layers on a fixed input, float64: a smooth loss with an autograd gradient."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(3, 3, dtype=torch.float64) for _ in range(3))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
        self.register_buffer("x", torch.randn(4, 3, generator=generator, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        h = self.x
        for block in self.blocks:
            h = torch.tanh(block(h))
        return h.sum(0) @ torch.arange(1.0, 4.0, dtype=torch.float64)


@pytest.mark.parametrize("one_point", [False, True])
def test_block_estimate_is_unbiased_for_the_block_gradient(one_point: bool) -> None:
    samples = 1200
    model = Chain()
    model().backward()
    true = [torch.cat([p.grad.reshape(-1) for p in b.parameters()]) for b in model.blocks]
    eps = 1e-6 if one_point else 1e-4  # one-point's bias is O(eps)
    optimizer = BlockZO(model.parameters(), model=model, lr=0.0, eps=eps, one_point=one_point)
    totals = [torch.zeros_like(t) for t in true]
    for _ in range(samples * len(true)):
        unit = optimizer.unit_at(optimizer.step_count)
        estimate = optimizer.estimate(model)
        direction = [
            optimizer.engine.direction(estimate.seeds[0], i).double().reshape(-1)
            for i in unit.groups[0]
        ]
        totals[unit.block] += estimate.scalars[0] * torch.cat(direction)
        optimizer.step()
    for total, gradient in zip(totals, true, strict=True):
        mean = total / samples
        # per coordinate, Var[(g.z) z_j] = |g|^2 + g_j^2 for Gaussian z
        standard_error = ((gradient.square().sum() + gradient.square()) / samples).sqrt()
        assert torch.all((mean - gradient).abs() < 5 * standard_error), (mean, gradient)


# ---------------------------------------------------------------------------- reuse
def _run(family: str, reuse: bool, steps: int, **options) -> tuple[list, list, dict]:
    model, optimizer = _build(family, reuse_activations=reuse, **options)
    batches = [IDS, IDS.flip(0), IDS[:, 1:]]
    scalars, losses = [], []
    for step in range(steps):
        for batch in batches[: 1 + step % 2]:  # one or two micro-batches per step
            optimizer.estimate(lambda b=batch: lm_loss(model, b))
        losses.append(optimizer.step())
        scalars.append(optimizer.last_record.scalars)
    return scalars, losses, _snapshot(model)


FAST_FAMILIES = ["llama", "opt"]
FAMILY_CASES = [
    family if family in FAST_FAMILIES else pytest.param(family, marks=pytest.mark.slow)
    for family in sorted(FAMILIES)
]


@pytest.mark.parametrize("family", FAMILY_CASES)
@pytest.mark.parametrize("one_point", [False, True])
def test_reusing_activations_changes_nothing(family: str, one_point: bool) -> None:
    options = {"one_point": one_point, "queries": 2, "order": "shuffle"}
    with_reuse = _run(family, True, 4, **options)
    without = _run(family, False, 4, **options)
    assert with_reuse[0] == without[0]  # projected gradients, bit for bit
    assert with_reuse[1] == without[1]
    for name, tensor in without[2].items():
        assert torch.equal(with_reuse[2][name], tensor), name


def _linear_calls_per_block(model: nn.Module, optimizer: BlockZO, step) -> list[int]:
    counts = [0] * len(optimizer.blocks)

    def counter(position: int):
        def hook(module, args) -> None:
            counts[position] += 1

        return hook

    handles = [
        linear.register_forward_pre_hook(counter(position))
        for position, block in enumerate(optimizer.blocks)
        for linear in block.modules()
        if isinstance(linear, nn.Linear)
    ]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize("one_point", [False, True])
def test_blocks_before_the_chosen_one_run_once_per_estimate(one_point: bool) -> None:
    counts = {}
    for reuse in (True, False):
        model, optimizer = _build(reuse_activations=reuse, queries=3, one_point=one_point)
        optimizer.step(lambda m=model: lm_loss(m))  # step 0 perturbs block 0: nothing to skip
        counts[reuse] = _linear_calls_per_block(
            model, optimizer, lambda m=model, o=optimizer: o.step(lambda: lm_loss(m))
        )
    per_pass = counts[False][0] // (4 if one_point else 6)  # L(W) + 3 queries, or 2 x 3
    assert counts[True] == [per_pass, counts[False][1]]


def test_reuse_works_over_checkpointed_blocks_and_puts_their_wrapper_back() -> None:
    model, optimizer = _build()
    reference, plain = _build(reuse_activations=False)
    checkpoint_blocks(model)
    wrappers = [block.__dict__["forward"] for block in optimizer.blocks]
    for _ in range(3):
        optimizer.step(lambda: lm_loss(model))
        plain.step(lambda: lm_loss(reference))
        assert optimizer.last_record.scalars == plain.last_record.scalars
    assert [block.__dict__["forward"] for block in optimizer.blocks] == wrappers


def test_a_closure_that_changes_its_forwards_is_refused_with_reuse() -> None:
    model, optimizer = _build()
    optimizer.step(lambda: lm_loss(model))
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        return sum(lm_loss(model) for _ in range(len(calls)))

    with pytest.raises(PrefixReplayError, match="reuse_activations=False"):
        optimizer.step(closure)
    assert "forward" not in optimizer.blocks[0].__dict__  # the block's own forward is back


# ---------------------------------------------------------------------------- replay, resume
def _batches(tokenizer, count: int):
    task = tasks.get_task("sentiment")
    examples = task.load("train")
    return [
        tasks.encode_candidates(tokenizer, task, examples[4 * i : 4 * i + 4]) for i in range(count)
    ]


def test_records_replay_bit_for_bit_and_name_their_block() -> None:
    model, optimizer = _build(order="random", queries=2)
    _, tokenizer = tiny_model("llama")
    records = []
    for batch in _batches(tokenizer, 4):
        optimizer.step(lambda b=batch: tasks.classification_loss(model, b))
        records.append(estimators.StepRecord.from_dict(optimizer.last_record.to_dict()))
    assert [r.extra["block_name"] for r in records] == [
        optimizer.unit_at(step).name for step in range(4)
    ]
    replayed, replayer = _build(order="random", queries=2)
    for record in records:
        replayer.apply_record(record)
    for (n, p), q in zip(model.named_parameters(), replayed.parameters(), strict=True):
        assert torch.equal(p, q), n
    _, fresh = _build(order="random", queries=2)
    records[0].extra["block_name"] = "model.layers.9"
    with pytest.raises(ValueError, match="the trainable set differs"):
        fresh.apply_record(records[0])


def test_state_dict_round_trip_resumes_bit_exactly() -> None:
    _, tokenizer = tiny_model("llama")
    batches = _batches(tokenizer, 6)

    def train(model, optimizer, part) -> None:
        for batch in part:
            optimizer.step(lambda b=batch: tasks.classification_loss(model, b))

    model, optimizer = _build(order="shuffle", weight_decay=0.1)
    train(model, optimizer, batches)
    uninterrupted = _snapshot(model)

    model, optimizer = _build(order="shuffle", weight_decay=0.1)
    train(model, optimizer, batches[:4])
    buffer = io.BytesIO()
    torch.save({"weights": _snapshot(model), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed_model, resumed = _build(order="shuffle", weight_decay=0.1)
    with torch.no_grad():
        for n, p in resumed_model.named_parameters():
            p.copy_(saved["weights"][n])
    resumed.load_state_dict(saved["optimizer"])
    train(resumed_model, resumed, batches[4:])
    for n, p in resumed_model.named_parameters():
        assert torch.equal(p, uninterrupted[n]), n

    _, other = _build(order="cycle")
    with pytest.raises(ValueError, match="keep the order and the trainable set"):
        other.load_state_dict(saved["optimizer"])
