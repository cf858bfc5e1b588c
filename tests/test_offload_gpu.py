"""Offloaded ZO on CUDA: blocks in pinned host memory, copies on a side stream, k + 1 slots.

Against the plain run on the same GPU: bit for bit with Rademacher directions (their signs
are the same drawn at home on the CPU as on the device, and ``W + c * (+-1)`` rounds once
either way); with Gaussian ones the home draws (CPU) may differ from the device's (Triton)
by an ulp, so there the reference is the offloaded run without overlap (``streams=off``),
bit for bit, and the plain run within a tolerance."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch

import estimators
from estimators.zo_sgd import ZOSGD
from tests.test_cli import SMOKE
from tests.test_offload_schedule import IDS as STACK_IDS
from tests.test_offload_schedule import Stack
from tests.tiny import fresh_tiny
from zo.blocks import decoder_blocks
from zo.config import load_config
from zo.engine import EngineConfig, seeded
from zo.memory.parallel import plan_offloaded
from zo.memory.shapes import shape_from_hf_config
from zo.memory.step import PlanRequest
from zo.models.registry import family_model_class, get_family
from zo.models.tiny import TinySpec, tiny_config
from zo.offload import StreamCopies, offload_blocks
from zo.train import build_setup

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


def deep_llama(path: Path) -> Path:
    """A Llama checkpoint whose 8 blocks are nearly all of its weights (~109 MB in fp32)."""
    _, tokenizer = fresh_tiny("llama")
    spec = TinySpec(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden=512,
        heads=8,
        intermediate=1536,
        layers=8,
    )
    config = tiny_config("llama", spec)
    with seeded(0):
        model = family_model_class(get_family("llama"))(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


@pytest.mark.parametrize("prefetch", [1, 2])
def test_build_setup_offloaded_puts_only_the_outside_and_k_plus_1_slots_on_the_device(
    prefetch, tmp_path
):
    """From loading on, the device holds the embeddings, norm, head, buffers and k + 1 block
    slots, never a block's weights (a model larger than the device loads); what stays there
    is the weights plan_offloaded counts as resident."""
    path = deep_llama(tmp_path / "deep")
    overrides = [f"model.name={path}", "model.device=cuda", "train.parallel=offload"]
    config = load_config(SMOKE, [*overrides, f"train.offload_prefetch={prefetch}"])
    gc.collect()  # no earlier test's tensors freed while this one measures
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    setup = build_setup(config, offload=True)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before

    blocks = decoder_blocks(setup.model)
    home = [p for block in blocks for p in block.parameters()]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in home)
    in_blocks = {id(p) for p in home}
    outside_params = [p for p in setup.model.parameters() if id(p) not in in_blocks]
    assert all(t.device.type == "cuda" for t in [*outside_params, *setup.model.buffers()])
    outside = tensor_bytes([*outside_params, *setup.model.buffers()])
    block = tensor_bytes(blocks[0].parameters())
    slots = (prefetch + 1) * block
    aligned = 256 * len(list(blocks[0].parameters()))  # each slot view starts 256 bytes on
    assert tensor_bytes(home) == 8 * block
    assert outside + slots <= allocated <= outside + slots + (prefetch + 1) * aligned + (1 << 20)
    assert peak <= outside + slots + (prefetch + 1) * aligned + (1 << 20)  # < one more block

    request = PlanRequest(
        shape=shape_from_hf_config(setup.model.config.to_dict()),
        estimator=estimators.get_estimator("zo_sgd").planned(),
        device="cuda",
    )
    assert plan_offloaded(request, prefetch).resident == tensor_bytes(outside_params)
