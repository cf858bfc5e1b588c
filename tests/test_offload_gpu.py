"""Offloaded ZO on CUDA: blocks in pinned host memory, copies on a side stream, k + 1 slots.

Against the plain run on the same GPU: bit for bit with Rademacher directions (their signs
are the same drawn at home on the CPU as on the device, and ``W + c * (+-1)`` rounds once
either way); with Gaussian ones the home draws (CPU) may differ from the device's (Triton)
by an ulp, so there the reference is the offloaded run without overlap (``streams=off``),
bit for bit, and the plain run within a tolerance."""

from __future__ import annotations

import copy

import pytest
import torch

from estimators.zo_sgd import ZOSGD
from tests.test_offload_schedule import IDS as STACK_IDS
from tests.test_offload_schedule import Stack
from tests.tiny import fresh_tiny
from zo.engine import EngineConfig
from zo.offload import StreamCopies, offload_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")
IDS = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(5))


def train(model, distribution: str, steps: int = 3):
    engine = EngineConfig(generator="philox", distribution=distribution)
    optimizer = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=11, engine=engine)
    ids = IDS.to(CUDA)
    records = []
    for _ in range(steps):
        optimizer.step(lambda: model(input_ids=ids, labels=ids).loss)
        records.append(optimizer.last_record.to_dict())
    torch.cuda.synchronize()
    return records, {name: p.detach().cpu() for name, p in model.named_parameters()}


def tiny_on_cuda():
    model, _ = fresh_tiny("llama")
    return model.to(CUDA).eval()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_overlapped_offload_equals_the_plain_run_on_cuda(prefetch):
    base = tiny_on_cuda()
    plain, offloaded = copy.deepcopy(base), copy.deepcopy(base)
    streaming = offload_blocks(offloaded, CUDA, prefetch)
    assert isinstance(streaming.backend, StreamCopies)
    home = [p for block in offloaded.model.layers for p in block.parameters()]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in home)
    reference, expected = train(plain, "rademacher")
    records, weights = train(offloaded, "rademacher")
    assert records == reference
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def test_overlap_changes_nothing_and_gaussian_runs_match_the_plain_one_closely():
    base = tiny_on_cuda()
    overlapped, synchronous, plain = (copy.deepcopy(base) for _ in range(3))
    offload_blocks(overlapped, CUDA, 2)
    offload_blocks(synchronous, CUDA, 1, streams="off")
    records, weights = train(overlapped, "gaussian")
    reference, expected = train(synchronous, "gaussian")
    assert records == reference
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    _, close = train(plain, "gaussian")
    for name, tensor in close.items():  # home draws vs Triton's: an ulp per element at most
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_the_device_holds_k_plus_1_blocks_and_activations(prefetch):
    """The offloaded step's peak above the non-block weights and k + 1 slots is at most the
    plain step's peak above its whole model (activations, buckets) plus 1 MiB."""
    base = Stack(blocks=8, width=1024, vocab=64)
    block_bytes = sum(p.numel() * p.element_size() for p in base.layers[0].parameters())
    every = sum(p.numel() * p.element_size() for p in base.parameters())
    ids = STACK_IDS.to(CUDA)

    def peak_of_a_step(model) -> tuple[int, int]:
        optimizer = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=3)
        optimizer.step(lambda: model(ids))  # warm: kernels, buckets, plans
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step(lambda: model(ids))
        torch.cuda.synchronize()
        return resident, torch.cuda.max_memory_allocated()

    plain = copy.deepcopy(base).to(CUDA)
    resident, peak = peak_of_a_step(plain)
    plain_overhead = peak - every
    del plain
    torch.cuda.empty_cache()
    offloaded = copy.deepcopy(base)
    before = torch.cuda.memory_allocated()
    offload_blocks(offloaded, CUDA, prefetch)
    resident, peak = peak_of_a_step(offloaded)
    outside = every - 8 * block_bytes
    slots = (prefetch + 1) * block_bytes
    assert resident - before <= outside + slots + (1 << 20)
    assert peak - before - outside - slots <= plain_overhead + (1 << 20)
    assert peak - before < every - (8 - prefetch - 1) * block_bytes * 0.9  # blocks stay home
