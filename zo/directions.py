"""Direction generators: the value of ``z`` at any element of any trainable tensor.

A generator maps *global coordinates* -- ``(step seed, tensor index, element offset)`` -- to
a direction value, so any element range of a tensor can be drawn alone: chunking,
bucketing, thread count and sharding never change a value (a shard draws exactly its part).

* ``philox`` -- counter-based: element ``j`` of tensor ``i`` at step seed ``s`` comes from
  Philox4x32-10 with key ``s`` and counter ``(j // 4, i, 0)`` (its 4 words give 4 elements:
  Box-Muller on word pairs for gaussian, the top bit for rademacher). No generator state,
  so a range, a row gather or a shard costs only its own elements. On CUDA one Triton
  kernel (:mod:`zo.philox_triton`) draws and applies a whole bucket; on CPU it runs as torch
  integer ops, exact but ~7x slower than torch's own CPU generator (``zo bench generators``).
* ``torch-blocks`` -- the platform's generator in fixed blocks: element ``j`` is element
  ``j % TORCH_BLOCK`` of a block drawn by a ``torch.Generator`` on the tensor's device seeded
  with ``mix_seed(s, i, j // TORCH_BLOCK)``: mt19937 on CPU, the fastest gaussian measured
  there. A range costs its whole blocks.

The philox passes are registered operators (``torch.ops.zo.philox_*``): one dispatcher call
each, one kernel launch on CUDA. Integer stages are exact everywhere; the float transform
(log, cos, sin) follows the device's math library, so values are bit-identical on one device
type and torch version (the trajectory records both, and the generator's name).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

_MASK64 = (1 << 64) - 1
MASK32 = 0xFFFFFFFF


def splitmix64(value: int) -> int:
    """One round of the splitmix64 finaliser: a cheap, well-mixed 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """Fold integers into one 63-bit seed; order matters, collisions are negligible."""
    return _mixed(_MIX_START, parts) >> 1  # manual_seed takes any non-negative int < 2**64


_MIX_START = 0x5A4F2D454E47494E  # "ZO-ENGIN": keeps mix_seed(0) away from splitmix64(0)


def _mixed(state: int, parts) -> int:
    """``mix_seed``'s state after ``parts``: ``mix_seed(*a, *b) == _mixed(_mixed(S, a), b) >> 1``."""
    for part in parts:
        state = splitmix64(state ^ (int(part) & _MASK64))
    return state


DISTRIBUTIONS = ("gaussian", "rademacher")
"""Direction laws; both have ``E[z z^T] = I``."""

Job = Callable[[], None]

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def run_jobs(jobs: list[Job], threads: int) -> None:
    """Run independent jobs on a shared pool of ``threads`` workers (serially for one).

    Jobs that call torch ops release the GIL inside them, so CPU draws run in parallel;
    results never depend on the thread count (each job writes its own memory).
    """
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="zo-draw")
    for future in [pool.submit(job) for job in jobs]:
        future.result()


class DirectionGenerator(ABC):
    """Values of ``z`` by global coordinates, and the passes that apply them.

    ``block`` is the granularity at which a range costs nothing extra: callers that cut a
    tensor into chunks align them to it. Every pass computes in fp32 and rounds once into
    the target's dtype; nothing here touches a global RNG.
    """

    name: str
    block: int

    def __init__(self, distribution: str = "gaussian", threads: int = 1):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"engine.distribution {distribution!r} is unknown; "
                f"choose one of {list(DISTRIBUTIONS)}"
            )
        self.distribution = distribution
        self.threads = threads

    @abstractmethod
    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        """``out[:] = z(seed, index)[start : start + out.numel()]``; ``out`` flat fp32."""

    @abstractmethod
    def rows_add(
        self,
        out: torch.Tensor,
        ids: torch.Tensor,
        seed: int,
        index: int,
        shape: tuple[int, int],
        scale: float,
    ) -> None:
        """Add ``scale * z(seed, index)`` at the rows ``ids`` of the ``shape``-d weight to
        ``out`` (``[ids.numel(), shape[1]]``): an embedding's output-side perturbation."""

    def axpz(
        self,
        sources: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        indices: Sequence[int],
        seeds: Sequence[int],
        coefficients: torch.Tensor,
        scale: float,
        decay: bool,
    ) -> None:
        """``targets[k] = d * sources[k] + sum_q (scale * c_q) z(seeds[q], indices[k])``.

        ``coefficients`` is ``[d, c_1 .. c_Q]`` in fp32 on the targets' device (a device
        tensor: an update needs no host read); ``d`` applies only when ``decay``. Sources
        and targets are flat and pairwise of one length; a target may be its own source (an
        in-place update). Each target is computed in fp32 and rounded once.
        """
        eager_axpz(self, sources, targets, indices, seeds, coefficients, scale, decay)

    def job_size(self) -> int:
        """Elements per job of a pass: a multiple of :attr:`block` near 1 Mi."""
        return self.block * max(1, (1 << 20) // self.block)


_SCRATCH = threading.local()


def _scratch(length: int, device: torch.device) -> torch.Tensor:
    """This thread's fp32 buffer of ``length`` (reused by its next job: no allocator churn)."""
    buffer = _SCRATCH.__dict__.get(device)
    if buffer is None or buffer.numel() < length:
        buffer = _SCRATCH.__dict__[device] = torch.empty(length, dtype=torch.float32, device=device)
    return buffer[:length]


def eager_axpz(generator, sources, targets, indices, seeds, coefficients, scale, decay) -> None:
    """:meth:`DirectionGenerator.axpz` in torch ops, job by job on the generator's threads."""
    factors = coefficients[1:] * scale
    jobs = []
    size = generator.job_size()
    for source, target, index in zip(sources, targets, indices, strict=True):
        for start in range(0, target.numel(), size):
            stop = min(start + size, target.numel())
            jobs.append(
                _axpz_job(
                    generator,
                    (source[start:stop], target[start:stop]),
                    (index, start),
                    seeds,
                    (coefficients, factors),
                    decay,
                )
            )
    run_jobs(jobs, generator.threads)


PIECE = 1 << 15
"""Elements per op inside a CPU job: at most torch's intra-op grain (32768), so each op runs
in the job's own thread. Jobs parallelise over the generator's pool instead of OpenMP
teams, which stall for milliseconds per op on a busy machine (measured: 7-13 ms instead of
0.2-1 ms for a 1 Mi-element mul or add with 2 threads under load, ``zo bench generators``)."""


def _axpz_job(generator, pair, address, seeds, coefficients, decay) -> Job:
    source, target = pair
    index, start = address
    all_coefficients, factors = coefficients

    def job() -> None:
        # z * c, then + w: two IEEE roundings, the same for every element wherever a call's
        # boundaries fall (a fused a + c*b may round a loop's scalar tail differently).
        in_place = source.data_ptr() == target.data_ptr() and target.dtype == torch.float32
        direct = not decay and target.dtype == source.dtype == torch.float32 and not in_place
        decay_by = all_coefficients[0] if decay else None
        terms = [(seed, factors[query]) for query, seed in enumerate(seeds)]
        z_all = _scratch(min(PIECE, target.numel()), target.device)
        for first in range(0, target.numel(), PIECE):
            last = min(first + PIECE, target.numel())
            piece_source, piece_target = source[first:last], target[first:last]
            z = z_all[: last - first]
            if in_place:
                acc = piece_target
            elif direct:
                acc = None  # the first term writes target = source + c z in one pass
            else:
                acc = piece_source.to(torch.float32, copy=True)
            if decay_by is not None and acc is not None:
                acc.mul_(decay_by)
            for seed, factor in terms:
                generator.fill(z, seed, index, start + first)
                z.mul_(factor)
                if acc is None:
                    acc = torch.add(piece_source, z, out=piece_target)
                else:
                    acc.add_(z)
            if acc is not piece_target:
                piece_target.copy_(acc)

    return job


def _add_scaled(out: torch.Tensor, rows: torch.Tensor, scale: float) -> None:
    """``out += scale * rows`` (rows is scratch): product, then sum, each rounded once."""
    rows.mul_(scale)
    if out.dtype == torch.float32:
        out.add_(rows)
    else:
        out.copy_(out.float().add_(rows))


# ---------------------------------------------------------------------------- philox
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
    seed: int, index: int, start: int, count: int, distribution: str, device
) -> torch.Tensor:
    """``count`` consecutive values of tensor ``index``'s direction from element ``start``."""
    first = start // 4
    last = (start + count + 3) // 4
    counters = torch.arange(first, last, dtype=torch.int64, device=device)
    words = philox4x32((counters & MASK32, counters >> 32, index, 0), philox_key(seed))
    values = words_to_values(words, distribution).view(-1)
    skip = start - 4 * first
    return values[skip : skip + count]


def _philox_fill(out: torch.Tensor, seed: int, index: int, start: int, distribution: str) -> None:
    for piece in range(0, out.numel(), PHILOX_PIECE):
        stop = min(piece + PHILOX_PIECE, out.numel())
        out[piece:stop] = philox_values(
            seed, index, start + piece, stop - piece, distribution, out.device
        )


def _philox_rows(
    ids: torch.Tensor, seed: int, index: int, row: int, distribution: str
) -> torch.Tensor:
    """``z`` at rows ``ids`` of a ``row``-wide weight, ``[ids.numel(), row]``."""
    flat_ids = ids.reshape(-1).to(torch.int64)
    first = flat_ids * row // 4  # each row's first counter
    width = row // 4 + 2  # counters spanning any row whatever its offset modulo 4
    counters = first.unsqueeze(1) + torch.arange(width, device=ids.device)
    words = philox4x32((counters & MASK32, counters >> 32, index, 0), philox_key(seed))
    values = words_to_values([w.reshape(-1) for w in words], distribution)
    values = values.view(flat_ids.numel(), width * 4)
    skip = (flat_ids * row - 4 * first).unsqueeze(1) + torch.arange(row, device=ids.device)
    return values.gather(1, skip)


class PhiloxGenerator(DirectionGenerator):
    name = "philox"
    block = 4

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        torch.ops.zo.philox_fill(out, seed, index, start, self.distribution, self.threads)

    def rows_add(self, out, ids, seed, index, shape, scale) -> None:
        torch.ops.zo.philox_rows_add(out, ids, seed, index, shape[1], scale, self.distribution)

    def axpz(self, sources, targets, indices, seeds, coefficients, scale, decay) -> None:
        torch.ops.zo.philox_axpz(
            list(sources),
            list(targets),
            list(indices),
            list(seeds),
            coefficients,
            scale,
            decay,
            self.distribution,
            self.threads,
        )

    def job_size(self) -> int:
        return PHILOX_PIECE * 8


class _EagerPhilox(PhiloxGenerator):
    """The CPU implementation behind the registered operators (and the tests' reference)."""

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        _philox_fill(out, seed, index, start, self.distribution)

    def rows_add(self, out, ids, seed, index, shape, scale) -> None:
        if ids.numel():
            _add_scaled(out, _philox_rows(ids, seed, index, shape[1], self.distribution), scale)

    def axpz(self, sources, targets, indices, seeds, coefficients, scale, decay) -> None:
        eager_axpz(self, sources, targets, indices, seeds, coefficients, scale, decay)


def _register_philox_operators() -> torch.library.Library:
    library = torch.library.Library("zo", "DEF")
    library.define(
        "philox_axpz(Tensor[] sources, Tensor(a!)[] targets, int[] indices, int[] seeds, "
        "Tensor coefficients, float scale, bool decay, str distribution, int threads) -> ()"
    )
    library.define(
        "philox_fill(Tensor(a!) out, int seed, int index, int start, str distribution, "
        "int threads) -> ()"
    )
    library.define(
        "philox_rows_add(Tensor(a!) out, Tensor ids, int seed, int index, int row, float scale, "
        "str distribution) -> ()"
    )

    def axpz_cpu(sources, targets, indices, seeds, coefficients, scale, decay, law, threads):
        _EagerPhilox(law, threads).axpz(
            sources, targets, indices, seeds, coefficients, scale, decay
        )

    def fill_cpu(out, seed, index, start, law, threads):
        _philox_fill(out, seed, index, start, law)

    def rows_cpu(out, ids, seed, index, row, scale, law):
        _EagerPhilox(law).rows_add(out, ids, seed, index, (0, row), scale)

    def axpz_cuda(sources, targets, indices, seeds, coefficients, scale, decay, law, threads):
        from zo import philox_triton

        philox_triton.axpz(sources, targets, indices, seeds, coefficients, scale, decay, law)

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


# ---------------------------------------------------------------------------- torch blocks
TORCH_BLOCK = 1 << 14
"""Elements per seeded block of ``torch-blocks``: part of its definition (changing it changes
every direction). Small enough that an embedding's rows cost few blocks, large enough that
seeding (~2 us) is noise next to drawing (~80 us)."""

_SIGNS = torch.tensor(
    [[1.0 - 2.0 * ((byte >> bit) & 1) for bit in range(8)] for byte in range(256)]
)
"""The 8 signs a random byte stands for: rademacher at one generator call per 8 elements."""


class TorchBlockGenerator(DirectionGenerator):
    name = "torch-blocks"
    block = TORCH_BLOCK

    def __init__(self, distribution: str = "gaussian", threads: int = 1):
        super().__init__(distribution, threads)
        self._local = threading.local()

    def _generator(self, device: torch.device) -> torch.Generator:
        generators = self._local.__dict__.setdefault("generators", {})
        if device not in generators:  # creating a CUDA generator per block is slow
            generators[device] = torch.Generator(device=device)
        return generators[device]

    def draw_block(self, out: torch.Tensor, seed: int, index: int, block: int) -> None:
        """The first ``out.numel()`` values of block ``block``: on CPU any multiple of 16 (a
        prefix of ``normal_`` equals the whole draw's prefix there), the whole block on CUDA
        (whose kernel maps elements to threads by the tensor's length)."""
        self._draw(out, _mixed(_MIX_START, (seed, index, block)) >> 1)

    def _draw(self, out: torch.Tensor, block_seed: int) -> None:
        generator = self._generator(out.device)
        generator.manual_seed(block_seed)
        if self.distribution == "gaussian":
            out.normal_(generator=generator)
            return
        bits = torch.empty(out.numel() // 8, dtype=torch.uint8, device=out.device)
        bits.random_(0, 256, generator=generator)
        table = _SIGNS if out.device.type == "cpu" else _SIGNS.to(out.device)
        torch.index_select(table, 0, bits.to(torch.int32), out=out.view(-1, 8))

    def _length(self, needed: int, device: torch.device) -> int:
        if device.type != "cpu":
            return TORCH_BLOCK
        return min(TORCH_BLOCK, -(-needed // 16) * 16)

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        stop = start + out.numel()
        position = start
        if start % TORCH_BLOCK == 0 and self.distribution == "gaussian":
            # the hot path (whole blocks): one hash and two calls per block
            prefix = _mixed(_MIX_START, (seed, index))
            generator = self._generator(out.device)
            first = start // TORCH_BLOCK
            for block in range(out.numel() // TORCH_BLOCK):
                generator.manual_seed(splitmix64(prefix ^ (first + block)) >> 1)
                out[block * TORCH_BLOCK : (block + 1) * TORCH_BLOCK].normal_(generator=generator)
            position = start + out.numel() // TORCH_BLOCK * TORCH_BLOCK
        while position < stop:
            block, within = divmod(position, TORCH_BLOCK)
            take = min(TORCH_BLOCK - within, stop - position)
            length = self._length(within + take, out.device)
            piece = out[position - start : position - start + take]
            if within == 0 and take == length:
                self.draw_block(piece, seed, index, block)
            else:
                buffer = self._block_buffer(out.device)[:length]
                self.draw_block(buffer, seed, index, block)
                piece.copy_(buffer[within : within + take])
            position += take

    def _block_buffer(self, device: torch.device) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        if device not in buffers:
            buffers[device] = torch.empty(TORCH_BLOCK, dtype=torch.float32, device=device)
        return buffers[device]

    def job_size(self) -> int:
        return TORCH_BLOCK * 64

    def rows_add(self, out, ids, seed, index, shape, scale) -> None:
        row = shape[1]
        flat_ids = ids.reshape(-1).to(torch.int64)
        if flat_ids.numel() == 0:
            return
        if ids.device.type == "cpu":
            _add_scaled(out, self._rows_cpu(flat_ids, seed, index, row), scale)
            return
        # On a GPU, choosing blocks by token would read the ids on the host: every block of
        # the tensor is drawn instead, 64 at a time, and the rows gathered under masks.
        offsets = flat_ids.unsqueeze(1) * row + torch.arange(row, device=ids.device)
        total = -(-shape[0] * row // TORCH_BLOCK)
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        group = 64
        for first in range(0, total, group):
            count = min(group, total - first)
            drawn = torch.empty(count, TORCH_BLOCK, device=out.device)
            for position in range(count):
                self.draw_block(drawn[position], seed, index, first + position)
            local = offsets - first * TORCH_BLOCK
            hit = (local >= 0) & (local < count * TORCH_BLOCK)
            picked = drawn.view(-1)[local.clamp(0, count * TORCH_BLOCK - 1)]
            acc.add_(torch.where(hit, picked, 0.0))
        _add_scaled(out, acc, scale)

    def _rows_cpu(self, flat_ids, seed, index, row) -> torch.Tensor:
        """The batch's rows, drawing only the blocks they touch, each once (reading the ids
        is no device sync on a CPU). Memory: the distinct rows and a block per thread."""
        tokens = flat_ids.tolist()
        distinct = sorted(set(tokens))
        position = {token: p for p, token in enumerate(distinct)}
        values = torch.empty(len(distinct), row)
        per_job = -(-len(distinct) // max(1, self.threads))
        run_jobs(
            [
                _rows_job(self, values, distinct, (first, first + per_job), seed, index, row)
                for first in range(0, len(distinct), per_job)
            ],
            self.threads,
        )
        return values[torch.tensor([position[token] for token in tokens])]


def _rows_job(generator, values, distinct, span, seed, index, row) -> Job:
    """Rows ``distinct[span]`` (sorted) into ``values``: blocks drawn in order, each once."""

    def job() -> None:
        blocks: dict[int, torch.Tensor] = {}
        for slot in range(*span):
            if slot >= len(distinct):
                return
            start = distinct[slot] * row
            stop = start + row
            for block in range(start // TORCH_BLOCK, (stop - 1) // TORCH_BLOCK + 1):
                if block not in blocks:
                    blocks = {b: t for b, t in blocks.items() if b >= start // TORCH_BLOCK}
                    blocks[block] = torch.empty(TORCH_BLOCK)
                    generator.draw_block(blocks[block], seed, index, block)
                first = max(start, block * TORCH_BLOCK)
                last = min(stop, (block + 1) * TORCH_BLOCK)
                values[slot, first - start : last - start] = blocks[block][
                    first - block * TORCH_BLOCK : last - block * TORCH_BLOCK
                ]

    return job


# ---------------------------------------------------------------------------- registry
GENERATORS: dict[str, type[DirectionGenerator]] = {
    "philox": PhiloxGenerator,
    "torch-blocks": TorchBlockGenerator,
}


def default_generator(device: torch.device | str) -> str:
    """``auto``'s choice, by measurement: philox on CUDA (one fused kernel per bucket),
    torch-blocks on CPU (mt19937 draws gaussians ~7x faster than philox in torch ops)."""
    return "philox" if torch.device(device).type == "cuda" else "torch-blocks"
