"""Direction generators against references: Random123's Philox vectors, global coordinates
(a tensor drawn whole equals its parts drawn anywhere), row gathers, the fused passes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from zo.directions import generators
from zo.philox import PhiloxGenerator, philox4x32, philox_values
from zo.torch_blocks import TORCH_BLOCK, TorchBlockGenerator

GENERATORS = generators()

ROOT = Path(__file__).resolve().parent.parent
LAWS = ["gaussian", "rademacher"]


def whole(generator, seed: int, index: int, numel: int) -> torch.Tensor:
    out = torch.empty(numel)
    generator.fill(out, seed, index, 0)
    return out


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123's known-answer vectors for philox4x32-10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    words = philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("law", LAWS)
def test_a_tensor_drawn_whole_equals_its_parts_drawn_at_any_split(name, law):
    """Global coordinates: what a shard, a bucket or a chunk draws is its slice of the
    whole, wherever the cut falls (inside a philox counter, inside a torch block)."""
    generator = GENERATORS[name](law)
    numel = 2 * TORCH_BLOCK + 1001
    reference = whole(generator, 77, 3, numel)
    cuts = torch.randperm(numel - 1, generator=torch.Generator().manual_seed(0))[:9] + 1
    splits = [0, 1, 3, TORCH_BLOCK, *sorted(set(cuts.tolist())), numel - 2, numel]
    splits = sorted(set(splits))
    parts = []
    for start, stop in pairwise(splits):
        out = torch.empty(stop - start)
        generator.fill(out, 77, 3, start)
        parts.append(out)
    assert torch.equal(torch.cat(parts), reference)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_values_depend_on_seed_and_tensor_and_follow_the_law(name):
    gaussian = GENERATORS[name]("gaussian")
    z = whole(gaussian, 1, 0, 200_000)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.1  # gaussian tails, not a uniform or a sign
    assert not torch.equal(z[:100], whole(gaussian, 2, 0, 100))
    assert not torch.equal(z[:100], whole(gaussian, 1, 1, 100))
    signs = whole(GENERATORS[name]("rademacher"), 1, 0, 10_000)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(signs.mean())) < 0.05


def test_philox_elements_are_counter_words():
    """Element 4n+lane of tensor i is lane ``lane`` of Philox(counter=(n, 0, i, 0))."""
    seed, index = 0x1234_5678_9ABC, 5
    words = philox4x32(
        (torch.arange(8), 0, index, 0), (seed & 0xFFFFFFFF, seed >> 32)
    )  # counters 0..7
    signs = 1.0 - 2.0 * torch.stack([(w >> 31).float() for w in words], dim=1).reshape(-1)
    assert torch.equal(philox_values(seed, index, 0, 32, "rademacher", "cpu"), signs)


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("law", LAWS)
def test_rows_add_gathers_exactly_the_rows_of_the_whole_direction(name, law):
    generator = GENERATORS[name](law)
    shape = (3000, 23)  # rows straddle philox counters and torch blocks
    reference = whole(generator, 9, 4, shape[0] * shape[1]).view(shape)
    ids = torch.tensor([[0, 2999, 712], [712, 5, 1424]])
    out = torch.zeros(ids.numel(), shape[1])
    generator.rows_add(out, ids, 9, 4, shape, 0.25)
    assert torch.equal(out, reference[ids.reshape(-1)] * 0.25)


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_axpz_is_the_update_formula_with_the_same_arithmetic(name, dtype):
    """In place, two seeds, decay: each term rounded as ``z * c`` then added, in fp32."""
    generator = GENERATORS[name]("gaussian", 2)
    weights = [torch.randn(n).to(dtype) for n in (5, 1000, TORCH_BLOCK + 7)]
    before = [w.clone() for w in weights]
    coefficients = torch.tensor([0.9, 0.5, -0.25])
    generator.axpz(weights, weights, [0, 1, 2], [11, 12], coefficients, 0.1, True)
    factors = coefficients[1:] * 0.1
    for index, (weight, old) in enumerate(zip(weights, before, strict=True)):
        acc = old.float() * coefficients[0]
        acc = acc + whole(generator, 11, index, old.numel()) * factors[0]
        acc = acc + whole(generator, 12, index, old.numel()) * factors[1]
        assert torch.equal(weight, acc.to(dtype))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_a_bucket_pass_writes_perturbed_copies_into_one_buffer(name):
    generator = GENERATORS[name]("gaussian")
    sources = [torch.randn(300), torch.randn(77)]
    buffer = torch.empty(377)
    targets = list(buffer.split([300, 77]))
    one = torch.tensor([1.0, 1.0])
    generator.axpz(sources, targets, [4, 9], [5], one, 0.01, False)
    for source, target, index in zip(sources, targets, [4, 9], strict=True):
        expected = source + whole(generator, 5, index, source.numel()) * (one[1] * 0.01)
        assert torch.equal(target, expected)
    assert all(torch.equal(s, s.clone()) for s in sources)


def test_torch_blocks_draws_on_threads_bit_identically():
    serial, threaded = TorchBlockGenerator("gaussian", 1), TorchBlockGenerator("gaussian", 4)
    weights = [torch.randn(3 * TORCH_BLOCK + 5), torch.randn(17)]
    copies = [w.clone() for w in weights]
    coefficients = torch.tensor([1.0, 0.3])
    serial.axpz(weights, weights, [0, 1], [3], coefficients, 1.0, False)
    threaded.axpz(copies, copies, [0, 1], [3], coefficients, 1.0, False)
    assert all(torch.equal(a, b) for a, b in zip(weights, copies, strict=True))


def test_philox_passes_are_single_registered_operators():
    """One dispatcher call per pass (one kernel launch on CUDA), whatever the tensor count."""
    from zo.opcount import OpCounter

    generator = PhiloxGenerator("gaussian")
    weights = [torch.randn(64) for _ in range(20)]
    with OpCounter() as counter:
        generator.axpz(weights, weights, range(20), [1], torch.tensor([1.0, 0.1]), 1.0, True)
    assert dict(counter.result.compute) == {"zo.philox_axpz": 1}


TRITON_INTERPRETER_CHECK = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {root!r})
    import torch
    from zo import philox_triton
    from zo.philox import philox_values

    for law in ("gaussian", "rademacher"):
        for start, count in ((0, 5000), (3, 2999), (4097, 1)):
            out = torch.empty(count)
            philox_triton.fill(out, 0x123456789AB, 7, start, law)
            eager = philox_values(0x123456789AB, 7, start, count, law, "cpu")
            tolerance = 0.0 if law == "rademacher" else 1e-6
            assert (out - eager).abs().max() <= tolerance, (law, start)
    weights = [torch.randn(1000), torch.randn(37, 3).view(-1), torch.randn(5)]
    expected = [
        w * 0.9
        + philox_values(11, i, 0, w.numel(), "gaussian", "cpu") * (0.5 * 2.0)
        + philox_values(12, i, 0, w.numel(), "gaussian", "cpu") * (-0.25 * 2.0)
        for i, w in enumerate(weights)
    ]
    philox_triton.axpz(weights, weights, [0, 1, 2], [11, 12], torch.tensor([0.9, 0.5, -0.25]),
                       2.0, True, "gaussian")
    assert all((w - e).abs().max() < 1e-5 for w, e in zip(weights, expected))
    ids = torch.tensor([[3, 0], [9, 3]])
    rows = torch.zeros(4, 10)
    philox_triton.rows_add(rows, ids, 21, 2, 10, 0.5, "rademacher")
    full = philox_values(21, 2, 0, 100, "rademacher", "cpu").view(10, 10)
    assert torch.equal(rows, 0.5 * full[ids.reshape(-1)])

    # The whole engine on the kernels: 3 ZO-SGD steps, 5 queries (two launches), decay,
    # bucket passes, output-side rows and head. Rademacher values are exact, so the weights
    # must be bit-identical to the eager engine's.
    from estimators import ZOSGD
    from tests.test_engine import TiedLM
    from tests.test_zo_sgd import lm_loss
    from zo.philox import PhiloxGenerator
    from zo.engine import EngineConfig

    class TritonPhilox(PhiloxGenerator):
        def fill(self, out, seed, index, start):
            philox_triton.fill(out, seed, index, start, self.distribution)

        def rows_add(self, out, ids, seed, index, shape, scale):
            philox_triton.rows_add(out, ids, seed, index, shape[1], scale, self.distribution)

        def axpz(self, sources, targets, indices, seeds, coefficients, scale, decay):
            philox_triton.axpz(
                sources, targets, indices, seeds, coefficients, scale, decay, self.distribution
            )

    trained = []
    for triton in (False, True):
        model = TiedLM(vocab=300, dim=32)
        config = EngineConfig(generator="philox", distribution="rademacher",
                              offload_threshold=0, bucket_size=700, threads=1)
        optimizer = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, weight_decay=0.1, queries=5,
                          seed=3, engine=config)
        if triton:
            optimizer.engine.generator = TritonPhilox("rademacher", 1)
        for _ in range(3):
            optimizer.step(lambda: lm_loss(model))
        trained.append(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*trained))
    print("ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernels_in_the_interpreter_match_the_eager_generator():
    """The CUDA kernels' logic on a CPU (Triton's interpreter; numpy's log/cos differ from
    torch's by an ulp, hence 1e-6 for gaussian values, exact for rademacher)."""
    script = TRITON_INTERPRETER_CHECK.format(root=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
