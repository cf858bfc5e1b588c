"""What every direction generator shares: seed mixing, the generator interface, the passes
in torch ops and the thread pool that runs them on CPU (:mod:`zo.directions` is the public
face and the registry; the generators themselves import this module, not that one)."""

from __future__ import annotations

import logging
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
    return mix_state(parts) >> 1  # manual_seed takes any non-negative int < 2**64


MIX_START = 0x5A4F2D454E47494E  # "ZO-ENGIN": keeps mix_seed(0) away from splitmix64(0)


def mix_state(parts: Sequence[int], state: int = MIX_START) -> int:
    """``mix_seed``'s state after ``parts``, to continue from:
    ``mix_seed(*a, *b) == mix_state(b, mix_state(a)) >> 1``."""
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
        starts: Sequence[int] | None = None,
    ) -> None:
        """``targets[k] = d * sources[k] + sum_q (scale * c_q) z(seeds[q], indices[k])``,
        the direction read from element ``starts[k]`` of tensor ``indices[k]`` on (0 when
        ``starts`` is None: the targets are whole tensors; a shard's rows start further on).

        ``coefficients`` is ``[d, c_1 .. c_Q]`` in fp32 on the targets' device (a device
        tensor: an update needs no host read); ``d`` applies only when ``decay``. Sources
        and targets are flat and pairwise of one length; a target may be its own source (an
        in-place update). Each target is computed in fp32 and rounded once.
        """
        eager_axpz(self, sources, targets, indices, seeds, coefficients, scale, decay, starts)

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


def eager_axpz(
    generator, sources, targets, indices, seeds, coefficients, scale, decay, starts=None
) -> None:
    """:meth:`DirectionGenerator.axpz` in torch ops, job by job on the generator's threads."""
    factors = coefficients[1:] * scale
    jobs = []
    size = generator.job_size()
    offsets = [0] * len(targets) if starts is None else starts
    for source, target, index, offset in zip(sources, targets, indices, offsets, strict=True):
        for start in range(0, target.numel(), size):
            stop = min(start + size, target.numel())
            jobs.append(
                _axpz_job(
                    generator,
                    (source[start:stop], target[start:stop]),
                    (index, offset + start),
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


def add_scaled(out: torch.Tensor, rows: torch.Tensor, scale: float) -> None:
    """``out += scale * rows`` (rows is scratch): product, then sum, each rounded once."""
    rows.mul_(scale)
    if out.dtype == torch.float32:
        out.add_(rows)
    else:
        out.copy_(out.float().add_(rows))


_SAID: set[str] = set()


def say_once(message: str, logger: str) -> None:
    """Log ``message`` as a warning of ``logger``, the first time this process says it: a
    path that cannot be taken (a kernel, a default) is reported, once, never skipped quietly."""
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger(logger).warning(message)
