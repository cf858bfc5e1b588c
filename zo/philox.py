"""The ``philox`` direction generator: counter-based, addressable by global coordinates.

Element ``j`` of tensor ``i`` at step seed ``s`` is lane ``j % 4`` of Philox4x32-10 (Salmon
et al., SC'11) with key ``s`` and counter ``(j // 4, i, 0)``: no generator state, so a range,
a row gather or a shard costs only its own elements, on any device. Gaussian values come
from Box-Muller on the word pairs (w0, w1) and (w2, w3), rademacher from each word's top bit.

Its passes are registered operators (``torch.ops.zo.philox_*``): one dispatcher call each,
one Triton kernel launch on CUDA (:mod:`zo.philox_triton`), torch integer ops on CPU (exact,
~7x slower than torch's own CPU generator: ``zo bench generators``). The integer stage is
bit-identical everywhere; the float transform (log, cos, sin) follows each device's math
library, so gaussian values agree across devices to an ulp, exactly on one device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from zo.direction_base import MASK32, DirectionGenerator, add_scaled, eager_axpz

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
TWO_PI = 2.0 * math.pi
_UNIT = 2.0**-24  # words keep their top 24 bits: exact in fp32


def philox4x32(
    counter: Sequence[torch.Tensor | int], key: tuple[int, int], rounds: int = PHILOX_ROUNDS
) -> list[torch.Tensor]:
    """Philox4x32 (Salmon et al., SC'11) on int64 tensors that hold uint32 values.

    ``counter`` is four words (tensors or ints, broadcast), ``key`` two ints. The 32x32->64
    products wrap in int64 (two's complement) and the mask after the arithmetic shift
    recovers the unsigned high word, so results equal the reference bit for bit (tests check
    the Random123 known-answer vectors).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(rounds):
        if round_:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = (
            ((p1 >> 32) & MASK32) ^ c1 ^ k0,
            p1 & MASK32,
            ((p0 >> 32) & MASK32) ^ c3 ^ k1,
            p0 & MASK32,
        )
    return [c0, c1, c2, c3]  # type: ignore[list-item]


def philox_key(seed: int) -> tuple[int, int]:
    return seed & MASK32, (seed >> 32) & MASK32


def words_to_values(words: list[torch.Tensor], distribution: str) -> torch.Tensor:
    """Four words per counter (1-D) -> ``[n, 4]`` fp32 values (element ``4 n + lane``).

    Gaussian: Box-Muller on (w0, w1) and (w2, w3), ``r = sqrt(-2 ln u)`` with ``u`` in
    (0, 1] from a word's top 24 bits (so ``|z| <= 5.77``); rademacher: each word's top bit.
    """
    if distribution == "rademacher":
        return torch.stack([1.0 - ((w >> 31) * 2).to(torch.float32) for w in words], dim=1)
    count = words[0].numel()
    out = torch.empty(count, 4, device=words[0].device)
    for first in range(0, count, MATH_GRAIN):
        last = min(first + MATH_GRAIN, count)
        for lane, (radius_word, angle_word) in ((0, words[:2]), (2, words[2:])):
            radius = ((radius_word[first:last] >> 8) + 1).to(torch.float32).mul_(_UNIT)
            radius = radius.log_().mul_(-2.0).sqrt_()
            angle = (angle_word[first:last] >> 8).to(torch.float32).mul_(_UNIT).mul_(TWO_PI)
            torch.mul(radius, torch.cos(angle), out=out[first:last, lane])
            torch.mul(radius, torch.sin(angle), out=out[first:last, lane + 1])
    return out


MATH_GRAIN = 2048
"""Elements per call of log/cos/sin on a CPU: torch splits its vectorised math over threads
above 2048 elements, and the first split in a process can round half the elements
differently (measured: torch 2.13 CPU with 2 threads, 1 process in 3), so every call stays
under it and runs in its caller's thread. Where ops run never changes a value."""


PHILOX_PIECE = 1 << 15
"""Elements per eager piece: under torch's intra-op grain (32768), so each op runs in one
thread and pieces parallelise over the generator's own threads."""


def philox_values(
    seed: int, index: int, start: int, count: int, distribution: str, device, transform=None
) -> torch.Tensor:
    """``count`` consecutive values of tensor ``index``'s direction from element ``start``,
    from the words by ``transform`` (default :func:`words_to_values`)."""
    first = start // 4
    last = (start + count + 3) // 4
    counters = torch.arange(first, last, dtype=torch.int64, device=device)
    words = philox4x32((counters & MASK32, counters >> 32, index, 0), philox_key(seed))
    values = (transform or words_to_values)(words, distribution).view(-1)
    skip = start - 4 * first
    return values[skip : skip + count]


def _philox_fill(out: torch.Tensor, seed: int, index: int, start: int, distribution: str) -> None:
    for piece in range(0, out.numel(), PHILOX_PIECE):
        stop = min(piece + PHILOX_PIECE, out.numel())
        out[piece:stop] = philox_values(
            seed, index, start + piece, stop - piece, distribution, out.device
        )


def philox_rows(
    ids: torch.Tensor,
    seed: int,
    index: int,
    row: int,
    distribution: str,
    transform=None,
) -> torch.Tensor:
    """``z`` at rows ``ids`` of a ``row``-wide weight, ``[ids.numel(), row]``, from the words
    by ``transform`` (default :func:`words_to_values`); no host read of the ids."""
    transform = transform or words_to_values
    flat_ids = ids.reshape(-1).to(torch.int64)
    first = flat_ids * row // 4  # each row's first counter
    width = row // 4 + 2  # counters spanning any row whatever its offset modulo 4
    counters = first.unsqueeze(1) + torch.arange(width, device=ids.device)
    words = philox4x32((counters & MASK32, counters >> 32, index, 0), philox_key(seed))
    values = transform([w.reshape(-1) for w in words], distribution)
    values = values.view(flat_ids.numel(), width * 4)
    skip = (flat_ids * row - 4 * first).unsqueeze(1) + torch.arange(row, device=ids.device)
    return values.gather(1, skip)


class PhiloxGenerator(DirectionGenerator):
    """Its passes are registered operators, ``torch.ops.zo.<operators>_{fill,rows_add,axpz}``:
    one dispatcher call per pass, whatever the device implements them with."""

    name = "philox"
    block = 4
    operators = "philox"

    def _operator(self, pass_: str):
        return getattr(torch.ops.zo, f"{self.operators}_{pass_}")

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        self._operator("fill")(out, seed, index, start, self.distribution, self.threads)

    def rows_add(self, out, ids, seed, index, shape, scale) -> None:
        self._operator("rows_add")(out, ids, seed, index, shape[1], scale, self.distribution)

    def axpz(
        self, sources, targets, indices, seeds, coefficients, scale, decay, starts=None
    ) -> None:
        self._operator("axpz")(
            list(sources),
            list(targets),
            list(indices),
            list(seeds),
            coefficients,
            scale,
            decay,
            self.distribution,
            self.threads,
            [0] * len(targets) if starts is None else list(starts),
        )

    def job_size(self) -> int:
        return PHILOX_PIECE * 8


class _EagerPhilox(PhiloxGenerator):
    """The CPU implementation behind the registered operators (and the tests' reference)."""

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        _philox_fill(out, seed, index, start, self.distribution)

    def rows_add(self, out, ids, seed, index, shape, scale) -> None:
        if ids.numel():
            add_scaled(out, philox_rows(ids, seed, index, shape[1], self.distribution), scale)

    def axpz(
        self, sources, targets, indices, seeds, coefficients, scale, decay, starts=None
    ) -> None:
        eager_axpz(self, sources, targets, indices, seeds, coefficients, scale, decay, starts)


def _register_philox_operators() -> torch.library.Library:
    library = torch.library.Library("zo", "DEF")
    library.define(
        "philox_axpz(Tensor[] sources, Tensor(a!)[] targets, int[] indices, int[] seeds, "
        "Tensor coefficients, float scale, bool decay, str distribution, int threads, "
        "int[] starts) -> ()"
    )
    library.define(
        "philox_fill(Tensor(a!) out, int seed, int index, int start, str distribution, "
        "int threads) -> ()"
    )
    library.define(
        "philox_rows_add(Tensor(a!) out, Tensor ids, int seed, int index, int row, float scale, "
        "str distribution) -> ()"
    )

    def axpz_cpu(
        sources, targets, indices, seeds, coefficients, scale, decay, law, threads, starts
    ):
        _EagerPhilox(law, threads).axpz(
            sources, targets, indices, seeds, coefficients, scale, decay, starts
        )

    def fill_cpu(out, seed, index, start, law, threads):
        _philox_fill(out, seed, index, start, law)

    def rows_cpu(out, ids, seed, index, row, scale, law):
        _EagerPhilox(law).rows_add(out, ids, seed, index, (0, row), scale)

    def axpz_cuda(
        sources, targets, indices, seeds, coefficients, scale, decay, law, threads, starts
    ):
        from zo import philox_triton

        philox_triton.axpz(
            sources, targets, indices, seeds, coefficients, scale, decay, law, starts
        )

    def fill_cuda(out, seed, index, start, law, threads):
        from zo import philox_triton

        philox_triton.fill(out, seed, index, start, law)

    def rows_cuda(out, ids, seed, index, row, scale, law):
        from zo import philox_triton

        philox_triton.rows_add(out, ids, seed, index, row, scale, law)

    for name, cpu, cuda in (
        ("philox_axpz", axpz_cpu, axpz_cuda),
        ("philox_fill", fill_cpu, fill_cuda),
        ("philox_rows_add", rows_cpu, rows_cuda),
    ):
        library.impl(name, cpu, "CPU")
        library.impl(name, cuda, "CUDA")
    return library


_LIBRARY = _register_philox_operators()
