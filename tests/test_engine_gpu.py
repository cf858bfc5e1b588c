"""The engine's CUDA paths: Triton's philox against the eager generator, global coordinates,
the fused passes' arithmetic, and a step that never waits for the device before its read."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from estimators import ZOSGD
from tests.test_engine import IDS, TiedLM
from tests.test_zo_sgd import lm_loss
from zo.directions import generators
from zo.engine import EngineConfig, PerturbationEngine
from zo.opcount import OpCounter
from zo.philox import PhiloxGenerator, philox_values
from zo.torch_blocks import TORCH_BLOCK

GENERATORS = generators()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def drawn(generator, seed, index, start, count, device="cuda") -> torch.Tensor:
    out = torch.empty(count, device=device)
    generator.fill(out, seed, index, start)
    return out


@pytest.mark.parametrize("law", ["gaussian", "rademacher"])
@pytest.mark.parametrize(("start", "count"), [(0, 5000), (3, 2999), (4097, 1), (7, 3 << 20)])
def test_triton_philox_equals_the_eager_generator(law, start, count):
    """Same counters and words; the gaussian transform uses libdevice's log/cos/sin on the
    GPU and torch's CPU kernels here, which may differ by an ulp (hence 1e-5); signs exact."""
    cuda = drawn(PhiloxGenerator(law), 0x1234_5678_9AB, 7, start, count).cpu()
    eager = philox_values(0x1234_5678_9AB, 7, start, count, law, "cpu")
    if law == "rademacher":
        assert torch.equal(cuda, eager)
    else:
        torch.testing.assert_close(cuda, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_a_tensor_drawn_whole_on_cuda_equals_its_parts(name):
    generator = GENERATORS[name]("gaussian")
    numel = 2 * TORCH_BLOCK + 1001
    whole = drawn(generator, 5, 2, 0, numel)
    splits = [0, 1, 3, 1000, TORCH_BLOCK + 5, numel - 2, numel]
    parts = [drawn(generator, 5, 2, a, b - a) for a, b in pairwise(splits)]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_embedding_rows_on_cuda_are_the_whole_directions_rows(name):
    generator = GENERATORS[name]("gaussian")
    shape = (3000, 23)
    whole = drawn(generator, 9, 4, 0, shape[0] * shape[1]).view(shape)
    ids = torch.tensor([[0, 2999, 712], [712, 5, 1424]], device="cuda")
    out = torch.zeros(ids.numel(), shape[1], device="cuda")
    generator.rows_add(out, ids, 9, 4, shape, 0.25)
    assert torch.equal(out, whole[ids.reshape(-1)] * 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_update_is_the_formula_with_the_same_rounding(dtype):
    """Five seeds (two launches), decay: each product and sum rounded once, no FMA, fp32."""
    generator = PhiloxGenerator("gaussian")
    weights = [torch.randn(n, device="cuda").to(dtype) for n in (5, 1000, 70_001)]
    before = [w.clone() for w in weights]
    seeds = [11, 12, 13, 14, 15]
    coefficients = torch.tensor([0.9, 0.5, -0.25, 0.125, 1.5, -2.0], device="cuda")
    generator.axpz(weights, weights, [0, 1, 2], seeds, coefficients, 0.1, True)
    factors = coefficients[1:] * 0.1
    for index, (weight, old) in enumerate(zip(weights, before, strict=True)):
        acc = old.float() * coefficients[0]
        for query, seed in enumerate(seeds):
            acc = acc + drawn(generator, seed, index, 0, old.numel()) * factors[query]
        assert torch.equal(weight, acc.to(dtype)), index


def test_triton_bucket_pass_writes_copies_into_one_buffer():
    generator = PhiloxGenerator("gaussian")
    sources = [torch.randn(300, device="cuda"), torch.randn(77, 3, device="cuda").view(-1)]
    buffer = torch.empty(300 + 231, device="cuda")
    targets = list(buffer.split([300, 231]))
    one = torch.tensor([1.0, 1.0], device="cuda")
    generator.axpz(sources, targets, [4, 9], [5], one, 0.01, False)
    for source, target, index in zip(sources, targets, [4, 9], strict=True):
        expected = source + drawn(generator, 5, index, 0, source.numel()) * (one[1] * 0.01)
        assert torch.equal(target, expected)


@pytest.mark.parametrize("generator", ["philox", "torch-blocks"])
def test_a_cuda_step_reads_the_device_once_after_its_update(generator):
    model = TiedLM(vocab=300, dim=32).cuda()
    ids = IDS.cuda()
    config = EngineConfig(generator=generator, offload_threshold=0)
    optimizer = ZOSGD(model.parameters(), lr=1e-2, weight_decay=0.1, engine=config)
    optimizer.step(lambda: lm_loss(model, ids))
    with OpCounter() as counter:
        optimizer.step(lambda: lm_loss(model, ids))
    result = counter.result
    assert [name for _, name in result.syncs] == ["_to_copy"]  # the scalars' one read
    if generator == "philox":
        last_update = max(i for i, name in enumerate(result.order) if name == "zo.philox_axpz")
        assert result.syncs[0][0] > last_update


@pytest.mark.parametrize("generator", ["philox", "torch-blocks"])
def test_prefetch_on_a_side_stream_changes_no_value(generator):
    model = TiedLM(vocab=300, dim=32).cuda()
    ids = IDS.cuda()
    outputs = []
    for prefetch in ("off", "on"):
        engine = PerturbationEngine(
            list(model.parameters()),
            EngineConfig(generator=generator, prefetch=prefetch, bucket_size=700),
        )
        for _ in range(2):
            with torch.no_grad(), engine.perturbed(3, 0.01):
                outputs.append(model(ids))
    assert all(torch.equal(o, outputs[0]) for o in outputs)


@pytest.mark.parametrize("generator", ["philox", "philox-ieee", "torch-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lr_zero_step_restores_bit_exactly_with_each_generator(generator, dtype):
    model = TiedLM().cuda().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = ZOSGD(
        model.parameters(), lr=0.0, eps=1e-2, engine=EngineConfig(generator=generator)
    )
    optimizer.step(lambda: lm_loss(model, IDS.cuda()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("law", ["gaussian", "rademacher"])
@pytest.mark.parametrize(("start", "count"), [(0, 5000), (3, 2999), (7, 1 << 20)])
def test_philox_ieee_on_cuda_equals_the_cpu_kernel_bit_for_bit(law, start, count):
    """Its transform is IEEE basic operations only: torch ops on the GPU give the CPU C
    kernel's bits (the same definition, another device)."""
    from zo.philox_ieee import PhiloxIEEEGenerator

    generator = PhiloxIEEEGenerator(law)
    cuda = drawn(generator, 0x1234_5678_9AB, 7, start, count).cpu()
    cpu = drawn(generator, 0x1234_5678_9AB, 7, start, count, device="cpu")
    assert torch.equal(cuda.view(torch.int32), cpu.view(torch.int32))
