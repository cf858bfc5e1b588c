"""Offload's schedule (which block is fetched, waited for, released when) and its hooks, on
CPU with a recording backend whose copies land late and whose released slots are poisoned:
a block used before its copy landed, or after its slot was released, would compute on NaN."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from estimators.zo_sgd import ZOSGD
from zo.engine import EngineConfig
from zo.offload import Action, Offloaded, Schedule


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.fc(self.norm(h)))


class Stack(nn.Module):
    """Embedding, ``blocks`` residual blocks in an ``nn.ModuleList``, a head."""

    def __init__(self, blocks: int = 5, width: int = 8, vocab: int = 31):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return F.cross_entropy(self.head(h[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


IDS = torch.randint(0, 31, (3, 7), generator=torch.Generator().manual_seed(2))


class LateCopies:
    """A fake asynchronous backend: a fetch lands only when waited for; a released slot is
    filled with NaN; fetching into a slot that was not released is refused."""

    pin_memory = False

    def __init__(self):
        self.device = torch.device("cpu")
        self.pending: dict[int, list] = {}
        self.landed: dict[int, list[torch.Tensor]] = {}
        self.events: list[tuple[str, int]] = []

    def fetch(self, slot, copies):
        assert slot not in self.pending and slot not in self.landed, f"slot {slot} is in use"
        self.pending[slot] = [(view, source.clone()) for view, source in copies]
        self.events.append(("fetch", slot))

    def wait(self, slot):
        self.landed[slot] = [view.copy_(source) for view, source in self.pending.pop(slot)]
        self.events.append(("wait", slot))

    def release(self, slot):
        views = self.landed.pop(slot, None) or [view for view, _ in self.pending.pop(slot)]
        for view in views:
            view.fill_(float("nan"))
        self.events.append(("release", slot))


def streamed(model: Stack, prefetch: int) -> tuple[Offloaded, list]:
    """``model``'s blocks on a :class:`LateCopies` backend; the log holds the schedule's
    actions and a ``compute`` entry as each block starts."""
    streaming = Offloaded(list(model.layers), LateCopies(), prefetch)
    log: list = []
    run = streaming.run
    streaming.run = lambda actions: (log.extend(actions), run(actions))
    for index, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda module, args, i=index: log.append(("compute", i)))
    return streaming, log


def test_one_pass_fetches_k_ahead_and_releases_each_block_after_its_compute():
    model = Stack(blocks=5)
    home = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = {}
    for index, block in enumerate(model.layers):
        block.fc.register_forward_pre_hook(
            lambda module, args, i=index: seen.__setitem__(i, module.weight.detach().clone())
        )
    streaming, log = streamed(model, prefetch=2)
    with torch.no_grad():
        loss = model(IDS)
    steps = [(a.kind, a.block) if isinstance(a, Action) else a for a in log]
    assert steps == [
        ("fetch", 0), ("fetch", 1), ("fetch", 2), ("wait", 0), ("compute", 0), ("release", 0),
        ("fetch", 3), ("wait", 1), ("compute", 1), ("release", 1),
        ("fetch", 4), ("wait", 2), ("compute", 2), ("release", 2),
        ("wait", 3), ("compute", 3), ("release", 3),
        ("wait", 4), ("compute", 4), ("release", 4),
    ]  # fmt: skip
    assert streaming.backend.events[:3] == [("fetch", 0), ("fetch", 1), ("fetch", 2)]
    assert ("fetch", 0) in streaming.backend.events[5:]  # block 3 took block 0's slot
    for index in range(5):  # each block computed on its own weights, from a slot
        assert torch.equal(seen[index], home[f"layers.{index}.fc.weight"])
    for name, param in model.named_parameters():  # home tensors are back, untouched
        assert torch.equal(param, home[name]), name
    plain = copy.deepcopy(model)
    streaming.remove()
    with torch.no_grad():
        assert torch.equal(loss, plain(IDS))


@pytest.mark.parametrize(
    ("blocks", "prefetch"), list(itertools.product([1, 2, 3, 6], [1, 2, 4, 7]))
)
def test_the_schedule_keeps_at_most_k_plus_1_blocks_and_never_reuses_a_busy_slot(blocks, prefetch):
    schedule = Schedule(blocks, prefetch)
    occupant: dict[int, int] = {}  # slot -> block
    landed: set[int] = set()

    def apply(actions):
        for action in actions:
            slot = schedule.slot(action.block)
            if action.kind == "fetch":
                assert slot not in occupant, (action, occupant)
                occupant[slot] = action.block
            elif action.kind == "wait":
                assert occupant.get(slot) == action.block
                landed.add(action.block)
            else:
                assert occupant.pop(slot) == action.block
                landed.discard(action.block)
            assert len(occupant) <= min(prefetch + 1, blocks)

    broken = blocks // 2  # the second pass raises in this block; the third starts afresh
    for last in (blocks - 1, broken, blocks - 1):
        for block in range(last + 1):
            apply(schedule.enter(block))
            assert block in landed
            ahead = set(range(block, min(block + prefetch, blocks - 1) + 1))
            assert set(occupant.values()) == ahead  # k ahead of the computing block, no more
            apply(schedule.leave(block))
    apply(schedule.enter(0))  # a pass after the broken one: nothing stale is kept
    assert set(occupant.values()) == set(range(min(prefetch, blocks - 1) + 1))


def test_a_changed_substitution_refetches_what_was_fetched_ahead():
    schedule = Schedule(4, 2)
    schedule.enter(0)
    schedule.leave(0)
    actions = schedule.enter(1, fresh=True)
    assert [(a.kind, a.block) for a in actions] == [
        ("release", 1), ("release", 2), ("fetch", 1), ("fetch", 2), ("fetch", 3), ("wait", 1),
    ]  # fmt: skip


def test_prefetch_below_1_is_refused():
    with pytest.raises(ValueError, match="prefetch must be >= 1"):
        Schedule(4, 0)


@pytest.mark.parametrize("prefetch", [1, 2, 6])
def test_late_copies_train_bit_identically_to_the_plain_model(prefetch):
    base = Stack(blocks=5)
    plain, offloaded = copy.deepcopy(base), copy.deepcopy(base)
    streaming, log = streamed(offloaded, prefetch)
    records = []
    for model in (plain, offloaded):
        optimizer = ZOSGD(
            model.parameters(), lr=0.05, eps=1e-3, seed=3, engine=EngineConfig(threads=1)
        )
        for _ in range(3):
            optimizer.step(lambda model=model: model(IDS))
        records.append([optimizer.last_record.to_dict()])
    assert records[0] == records[1]
    for (name, a), (_, b), (_, c) in zip(
        plain.named_parameters(),
        offloaded.named_parameters(),
        base.named_parameters(),
        strict=True,
    ):
        assert torch.equal(a, b), name  # the update reached the home tensors
        assert not torch.equal(b, c), name
    fetched = sum(1 for a in log if isinstance(a, Action) and a.kind == "fetch")
    assert fetched == 3 * 2 * 5  # steps x two forwards x blocks: nothing fetched twice
