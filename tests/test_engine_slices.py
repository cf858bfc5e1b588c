"""The engine over slices of tensors at global offsets (what a rank's shard is) against the
whole tensor's passes: every value is the one the whole tensor gets there, bit for bit."""

from __future__ import annotations

import pytest
import torch

from zo.engine import EngineConfig, PerturbationEngine

SHAPES = [(37, 11), (64,), (5, 3, 7)]  # rows that do not split evenly, a vector, 3-D


def whole_and_sliced(generator: str, cut: int):
    """An engine over whole tensors, and one over their rows from ``cut`` on (offsets)."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen) for shape in SHAPES]
    config = EngineConfig(generator=generator, threads=2, chunk_size=64)
    whole = PerturbationEngine([t.clone() for t in tensors], config)
    pieces = [t.clone()[min(cut, t.shape[0]) :].reshape(-1) for t in tensors]
    offsets = [min(cut, t.shape[0]) * t[0].numel() for t in tensors]
    return whole, PerturbationEngine(pieces, config, offsets=offsets), offsets


@pytest.mark.parametrize("generator", ["torch-blocks", "philox"])
@pytest.mark.parametrize("cut", [1, 3, 40])
def test_a_slice_engine_updates_and_draws_what_the_whole_tensors_get(generator, cut):
    whole, sliced, offsets = whole_and_sliced(generator, cut)
    whole.update([7, 8], [0.5, -0.25], decay=0.9)
    sliced.update([7, 8], [0.5, -0.25], decay=0.9)
    for index, (full, piece) in enumerate(zip(whole.tensors, sliced.tensors, strict=True)):
        start = offsets[index]
        assert torch.equal(full.reshape(-1)[start:], piece), index
        assert torch.equal(
            whole.direction(3, index).reshape(-1)[start:], sliced.direction(3, index)
        )
        assert torch.equal(sliced.local_part(index, full), piece)
        for chunk, first, last in sliced.chunks(index):  # per-element state walks these
            z = sliced.draw(3, index, chunk, last - first, "cpu")
            assert torch.equal(
                z, whole.direction(3, index).reshape(-1)[start + first : start + last]
            )


@pytest.mark.parametrize("generator", ["torch-blocks", "philox"])
def test_axpz_at_writes_a_perturbed_slice_from_its_global_offset(generator):
    whole, sliced, offsets = whole_and_sliced(generator, 3)
    one = torch.tensor([1.0, 1.0])
    index = 0
    expected = whole.perturbed_copy(5, index, 1e-2).reshape(-1)[offsets[index] :]
    out = torch.empty_like(sliced.tensors[index])
    sliced.axpz_at([sliced.tensors[index]], [out], [index], [5], one, 1e-2)
    assert torch.equal(out, expected)
    again = torch.empty_like(out)  # an explicit start addresses any slice, whatever the engine's
    whole.axpz_at([sliced.tensors[index]], [again], [index], [5], one, 1e-2, starts=[offsets[0]])
    assert torch.equal(again, expected)


def test_offsets_need_one_non_negative_entry_per_tensor():
    with pytest.raises(ValueError, match="one non-negative element offset per tensor"):
        PerturbationEngine([torch.zeros(3)], offsets=[0, 1])
    with pytest.raises(ValueError, match="one non-negative element offset per tensor"):
        PerturbationEngine([torch.zeros(3)], offsets=[-1])
