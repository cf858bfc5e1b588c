"""The engine's bucket buffers are reused, never while a view of them is in use, and reuse
changes no value: pooled runs equal runs that allocate every bucket afresh, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from estimators.zo_sgd import ZOSGD
from tests.test_engine import IDS, TiedLM, dense_reference, engine_for
from tests.tiny import IDS as TINY_IDS
from tests.tiny import fresh_tiny
from zo.buffer_pool import BufferPool, storage_users
from zo.engine import EngineConfig
from zo.memory import measure_call
from zo.offload import offload_blocks


def test_storage_users_counts_every_view_and_forgets_dropped_ones():
    """The torch API the pool's safety rests on: a view (of a view), a split, a parameter
    made of a view and a tensor an autograd graph saved each hold the storage."""
    base = torch.empty(100)
    alone = storage_users(base)
    view = base[10:20].view(2, 5)
    parts = base.split([50, 50])
    assert storage_users(base) == alone + 3
    del view, parts
    assert storage_users(base) == alone
    weight = nn.Parameter(base[:16].view(4, 4))
    out = (torch.ones(2, 4, requires_grad=True) @ weight.t()).sum()
    del weight  # the graph saved it for backward
    assert storage_users(base) > alone
    del out
    assert storage_users(base) == alone


def test_the_pool_hands_out_only_idle_buffers_and_keeps_at_most_its_slots():
    pool = BufferPool(slots=2)
    cpu = torch.device("cpu")
    first = pool.take(10, torch.float32, cpu)
    second = pool.take(10, torch.float32, cpu)  # first is in use: another buffer
    assert first.data_ptr() != second.data_ptr() and pool.allocations == 2
    third = pool.take(10, torch.float32, cpu)  # both kept ones busy, pool full: not kept
    assert len(pool.kept[(cpu, torch.float32)]) == 2 and pool.allocations == 3
    pointer = first.data_ptr()
    del first, third
    again = pool.take(8, torch.float32, cpu)
    assert again.data_ptr() == pointer and pool.allocations == 3  # reused
    del again
    larger = pool.take(50, torch.float32, cpu)  # idle ones too small: one is replaced
    assert larger.numel() == 50 and len(pool.kept[(cpu, torch.float32)]) == 2
    assert pool.take(4, torch.float16, cpu).dtype == torch.float16  # its own buffers
    assert pool.kept_bytes() == (10 + 50) * 4 + 4 * 2
    with pytest.raises(ValueError, match="slots"):
        BufferPool(slots=-1)


def zo_steps(
    model: nn.Module, steps: int, slots: int | None = None, **engine
) -> tuple[list[dict], list[int]]:
    """ZO-SGD steps on a tiny model: their records, and the pool's allocations so far after
    each. ``slots=0`` allocates every bucket afresh, as the engine did before the pool."""
    optimizer = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=3, engine=EngineConfig(**engine))
    if slots is not None:
        optimizer.engine.pool.slots = slots
    records, allocations = [], []
    for _ in range(steps):
        optimizer.step(lambda: model(input_ids=TINY_IDS, labels=TINY_IDS).loss)
        records.append(optimizer.last_record.to_dict())
        allocations.append(optimizer.engine.pool.allocations)
    optimizer.engine.close()
    return records, allocations


@pytest.mark.parametrize(
    ("bucket_size", "prefetch", "threads"), [(0, "off", 1), (3000, "off", 2), (3000, "on", 1)]
)
def test_pooled_steps_are_bit_identical_to_fresh_buffers(bucket_size, prefetch, threads):
    base, _ = fresh_tiny("llama")
    base.eval()
    pooled, fresh = copy.deepcopy(base), copy.deepcopy(base)
    settings = {"bucket_size": bucket_size, "prefetch": prefetch, "threads": threads}
    records, allocations = zo_steps(pooled, 4, **settings)
    reference, fresh_allocations = zo_steps(fresh, 4, slots=0, **settings)
    assert records == reference
    per_step = allocations[-1] - allocations[-2]  # a buffer per forward, not per bucket
    assert per_step == 2 * (1 + (prefetch == "on"))
    assert fresh_allocations[-1] - fresh_allocations[-2] > per_step or not bucket_size
    for (name, a), (_, b), (_, c) in zip(
        pooled.named_parameters(), fresh.named_parameters(), base.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name


@pytest.mark.parametrize("prefetch", ["off", "on"])
def test_a_forward_allocates_one_buffer_not_one_per_bucket(prefetch):
    model, _ = fresh_tiny("llama")
    model.eval()
    optimizer = ZOSGD(
        model.parameters(),
        lr=1e-2,
        eps=1e-3,
        seed=3,
        engine=EngineConfig(bucket_size=3000, prefetch=prefetch),
    )
    engine, pool = optimizer.engine, optimizer.engine.pool

    def step() -> None:
        optimizer.step(lambda: model(input_ids=TINY_IDS, labels=TINY_IDS).loss)

    step()  # learns the bucket plan (the first forward draws module by module)
    allocated = pool.allocations
    step()
    assert len(engine.plan.buckets) > 4  # many buckets, drawn into few buffers
    # two perturbed forwards, each: one buffer for the live bucket (a forward lets go of the
    # last before drawing the next), one more for the bucket drawn ahead
    assert pool.allocations - allocated == 2 * (1 + (prefetch == "on"))
    largest = max(sum(engine.tensors[i].numel() for i in bucket) for bucket in engine.plan.buckets)
    assert pool.reserved[(torch.device("cpu"), torch.float32)] == largest
    assert pool.kept_bytes() == 0  # nothing stays resident between forwards
    engine.close()


class Outer(nn.Module):
    """A module that reads its own weight after its children ran: its bucket must survive
    the children's draws (each tensor is a bucket of its own below)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.weight = nn.Parameter(torch.randn(8, 8, generator=generator))
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        with torch.no_grad():
            for param in self.inner.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) @ self.weight


@pytest.mark.parametrize("prefetch", ["off", "on"])
def test_a_parent_module_keeps_its_bucket_while_its_children_draw(prefetch):
    model = Outer()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    engine = engine_for(model, bucket_size=1, prefetch=prefetch)
    with torch.no_grad():
        expected = dense_reference(model, engine, 6, 0.1)(x)
        for _ in range(3):  # the first forward plans; the later ones draw by the plan
            with engine.perturbed(6, 0.1):
                assert torch.equal(model(x), expected)
    assert engine.pool.allocations >= 2  # the parent's buffer was busy: another was used
    engine.close()


def test_views_kept_after_a_forward_keep_their_values():
    """A caller that keeps what a module saw (here a hook; an autograd graph does the same)
    keeps its values through later forwards: a held buffer is never drawn into again."""
    model = TiedLM(vocab=300, dim=32)
    engine = engine_for(model, bucket_size=700)
    kept: list[tuple[nn.Module, str, torch.Tensor]] = []

    def keep(module, args):  # runs after the engine's hook: the module's perturbed views
        kept.extend((module, n, p) for n, p in module._parameters.items() if p is not None)

    with torch.no_grad():
        for seed in (1, 1, 2, 3):  # the first forward plans; every later one reuses
            with engine.perturbed(seed, 0.5):
                # registered inside the context: runs after the engine's hook
                hook = nn.modules.module.register_module_forward_pre_hook(keep)
                if seed != 2:
                    hook.remove()
                try:
                    model(IDS)
                finally:
                    hook.remove()
        reference = dense_reference(model, engine, 2, 0.5)
    assert kept
    for module, name, seen in kept:
        path = next(n for n, m in model.named_modules() if m is module)
        assert torch.equal(seen, reference.get_submodule(path)._parameters[name]), (path, name)
    engine.close()


def test_offloaded_copies_on_a_cpu_device_come_from_the_pool():
    """Offload's per-block copies (the substitution's ``replace``) reuse the pool's buffers
    too, and the run stays bit-identical to the plain one."""
    base, _ = fresh_tiny("llama")
    base.eval()
    plain, offloaded = copy.deepcopy(base), copy.deepcopy(base)
    offload_blocks(offloaded, torch.device("cpu"), 1)
    records, allocations = zo_steps(offloaded, 4, threads=1)
    assert records == zo_steps(plain, 4, slots=0, threads=1)[0]
    # per forward: one buffer for the bucket of the tensors outside the blocks, one for the
    # block copies (each block's copies are let go before the next block's are drawn)
    assert allocations[-1] - allocations[-2] == 2 * 2
    for (name, a), (_, b) in zip(
        plain.named_parameters(), offloaded.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_measure_call_counts_the_page_faults_of_fresh_memory():
    """What `zo bench step` reports besides wall time: touching fresh memory faults it in
    (64 MiB: above glibc's largest mmap threshold, so a new mapping whatever the setting)."""
    cost = measure_call(lambda: torch.ones(1 << 24))
    assert cost.minor_faults > 0 and cost.seconds > 0
    assert cost.user_seconds >= 0 and cost.system_seconds >= 0


def test_a_torch_without_storage_use_counts_allocates_afresh_and_says_so(monkeypatch, capsys):
    import zo.buffer_pool

    monkeypatch.setattr(zo.buffer_pool, "POOLING", False)
    monkeypatch.setattr(zo.buffer_pool, "_SAID", set())
    pool = BufferPool(slots=2)
    first, second = (pool.take(64, torch.float32, torch.device("cpu")) for _ in range(2))
    del first
    pool.take(64, torch.float32, torch.device("cpu"))
    assert pool.allocations == 3 and pool.kept_bytes() == 0
    assert capsys.readouterr().err.count("bucket buffers are not pooled") == 1
