"""Seed-replay perturbation engine: the only owner of randomness for directions.

Every zeroth-order estimator is a sequence of passes over the trainable tensors that add
``scale * z`` to them, where ``z`` is regenerated from a seed and never stored.

* Directions come from a generator (:mod:`zo.directions`) addressed by global coordinates
  ``(step seed, tensor index, element offset)``: how a pass cuts tensors into buckets or
  chunks, the thread count and the device placement never change a value. A step seed is
  ``mix_seed(run_seed, step, query)``; no global RNG is touched.
* Exact restore. Perturbations are *functional*: while a forward runs inside
  :meth:`PerturbationEngine.perturbed`, each module that owns a trainable tensor sees
  ``W + scale * z`` and the stored ``W`` is never written, so restoring is free and exact in
  every dtype, and a two-point step costs three passes over the weights, not four.
* Few kernels per pass. A perturbed forward materialises the trainable tensors a *bucket*
  at a time -- consecutive tensors in the order the previous forward used them, up to
  ``bucket_size`` elements -- in one generator call (one kernel on CUDA), and hands each
  module views of it; the next bucket can be drawn while the current one computes
  (``prefetch``). The update is one call over all tensors, with coefficients that may live on
  the device, so a step needs no host read until its scalars are recorded.
* Large embeddings and output heads are not copied (:mod:`zo.output_side`): an embedding
  adds its batch's rows of ``z`` to its output, a linear layer multiplies by ``W + scale z``
  a block of output features at a time, so a perturbed forward needs no more memory than a
  plain one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from zo.buckets import PerturbedForward, Plan, Swap, announced, swapping
from zo.buffer_pool import BufferPool
from zo.directions import (
    GENERATOR_NAMES,
    DirectionGenerator,
    default_generator,
    generators,
    mix_seed,
    run_jobs,
    splitmix64,
)
from zo.engine_config import (
    ACCELERATOR_BUCKET,
    ACCELERATOR_CHUNK,
    CPU_BUCKET,
    CPU_CHUNK,
    LEGACY_GENERATOR,
    EngineConfig,
    FrozenTensorError,
    UnperturbedForwardError,
    perturbs_through_output,
)
from zo.engine_config import PERTURBABLE_DTYPES as _PERTURBABLE_DTYPES

__all__ = [
    "ENGINE_VERSION",
    "EngineConfig",
    "FrozenTensorError",
    "PerturbationEngine",
    "UnperturbedForwardError",
    "build_engine",
    "engine_version",
    "mix_seed",
    "recorded_generator",
    "resolve_generator",
    "seeded",
    "splitmix64",
]

ENGINE_VERSION = "2"
"""1: per-chunk torch generators (``torch-chunks-v1``); 2: generators by global coordinates,
bucketed passes, device-side update coefficients. The trajectory header records it and the
generator's name; :func:`recorded_generator` maps a header back to its generator."""


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Draws inside come from ``seed`` (module inits that take no generator: transformers
    models, peft adapters); the global generators are restored on exit, so building
    something never shifts data order, dropout or a caller's own draws. Forks the CPU
    generator and, for a CUDA ``device``, that device's (forking every CUDA device would
    initialise them all and warn)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    forked = []
    if device.type == "cuda":
        forked = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        yield


def resolve_generator(config: EngineConfig, device: torch.device | str) -> str:
    """The generator a run with ``config`` on ``device`` draws with (``auto`` resolved)."""
    return default_generator(device) if config.generator == "auto" else config.generator


def engine_version(generator: str) -> str:
    """The engine version whose directions ``generator`` draws (what a header records)."""
    return "1" if generator == LEGACY_GENERATOR else ENGINE_VERSION


def recorded_generator(header: dict) -> str:
    """The generator a trajectory was written with, from its header.

    Version-1 headers name none: they drew with ``torch-chunks-v1``. A header from an engine
    version or generator this code does not know, or naming a generator of another engine
    version, is refused rather than replayed with other directions.
    """
    version = str(header.get("engine_version", ""))
    known = {"1", ENGINE_VERSION}
    advice = "resuming or replaying it here would draw other directions (use the zo that wrote it)"
    if version not in known:
        raise ValueError(
            f"the run was written by engine version {version!r}; this zo knows engine "
            f"versions {sorted(known)}: {advice}"
        )
    if "generator" not in header:
        if version == "1":
            return LEGACY_GENERATOR
        raise ValueError(f"engine version {version!r} names no direction generator: {advice}")
    generator = str(header["generator"])
    if generator not in (*GENERATOR_NAMES, LEGACY_GENERATOR):
        raise ValueError(
            f"the run drew its directions with generator {generator!r}, which this zo does "
            f"not have (it has {[*GENERATOR_NAMES, LEGACY_GENERATOR]}): {advice}"
        )
    if engine_version(generator) != version:
        raise ValueError(
            f"generator {generator!r} belongs to engine version {engine_version(generator)!r}, "
            f"the header says {version!r}: {advice}"
        )
    return generator


def build_engine(tensors: Sequence[torch.Tensor], config: EngineConfig | None = None):
    """The engine for ``config.generator``: version 2's, or version 1's for its old runs."""
    config = config or EngineConfig()
    if config.generator == LEGACY_GENERATOR:
        from zo.engine_v1 import EngineV1

        return EngineV1(tensors, config)
    return PerturbationEngine(tensors, config)


def _check_perturbable(tensors: Sequence[torch.Tensor]) -> dict[int, int]:
    for index, tensor in enumerate(tensors):
        if tensor.dtype not in _PERTURBABLE_DTYPES:
            raise FrozenTensorError(
                f"trainable tensor {index} has dtype {tensor.dtype}; the engine perturbs "
                "only floating-point tensors (a quantized base stays frozen: train a "
                "sparse delta or LoRA over it instead)"
            )
    positions = {id(t): i for i, t in enumerate(tensors)}
    if len(positions) != len(tensors):
        raise ValueError("the same tensor appears twice in the trainable set")
    return positions


def thread_scratch(local: threading.local, length: int, device) -> torch.Tensor:
    """``length`` fp32 elements of this thread's buffer on ``device`` (held in ``local``,
    grown when too small): valid until the thread's next call with the same ``local``."""
    device = torch.device(device)
    buffers = local.__dict__
    buffer = buffers.get(device)
    if buffer is None or buffer.numel() < length:
        buffer = buffers[device] = torch.empty(length, dtype=torch.float32, device=device)
    return buffer[:length]


class PerturbationEngine:
    """Draws seed-addressed directions over a fixed list of tensors and applies them.

    The tensor order is part of the seed address: tensor ``i`` of a run always draws
    with index ``i``. Keep the list (the trainable set's manifest) stable to replay.

    ``offsets[i]`` (default 0) is the global element offset of ``tensors[i]``'s first element:
    a tensor may be a contiguous slice of the trainable tensor ``i`` (a rank's shard of it,
    :mod:`zo.sharded`), and every pass then draws exactly that slice's part of ``z``. Such a
    slice is perturbed and updated through :meth:`axpz_at` and :meth:`update`; a perturbed
    forward (:meth:`perturbed`) only sees whole tensors that modules own.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        config: EngineConfig | None = None,
        offsets: Sequence[int] | None = None,
    ):
        self.config = config or EngineConfig()
        if self.config.generator == LEGACY_GENERATOR:
            raise ValueError("torch-chunks-v1 is version 1's engine: build it with build_engine")
        self.tensors = list(tensors)
        self.offsets = [0] * len(self.tensors) if offsets is None else [int(o) for o in offsets]
        if len(self.offsets) != len(self.tensors) or min(self.offsets, default=0) < 0:
            raise ValueError("offsets needs one non-negative element offset per tensor")
        self.positions = _check_perturbable(self.tensors)
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.generator_name = resolve_generator(self.config, self.device)
        threads = self.config.threads or min(8, torch.get_num_threads())
        self._threads = max(1, threads) if self.device.type == "cpu" else 1
        self.generator: DirectionGenerator = generators()[self.generator_name](
            self.config.distribution, self._threads
        )
        if self.generator_name == "philox" and self.device.type == "cuda":
            _require_triton()
        self.bucket_size = self.config.bucket_size or (
            CPU_BUCKET if self.device.type == "cpu" else ACCELERATOR_BUCKET
        )
        self.plan = Plan(self)
        self._constants: dict[tuple, torch.Tensor] = {}
        self.prefetcher: ThreadPoolExecutor | None = None
        self._scratch = threading.local()
        # the bucket a forward reads, one a parent module may still read while its children
        # draw the next, and the one drawn ahead (more are allocated, not kept)
        self.pool = BufferPool(slots=2 + int(self.prefetching()))

    # ------------------------------------------------------------------ directions
    def chunk_len(self, index: int) -> int:
        size = self.config.chunk_size or (
            CPU_CHUNK if self.tensors[index].device.type == "cpu" else ACCELERATOR_CHUNK
        )
        block = self.generator.block
        return size // block * block if size >= block else size  # small: exact, some waste

    def num_chunks(self, index: int) -> int:
        return max(1, -(-self.tensors[index].numel() // self.chunk_len(index)))

    def chunks(self, index: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(chunk, start, stop)`` over the flat view of tensor ``index``; chunks of a
        block or more fall on the generator's blocks, so they cost only their own draws."""
        numel = self.tensors[index].numel()
        step = self.chunk_len(index)
        for chunk, start in enumerate(range(0, max(numel, 1), step)):
            yield chunk, start, min(start + step, numel)

    def draw(self, seed: int, index: int, chunk: int, length: int, device) -> torch.Tensor:
        """Chunk ``chunk`` of z for tensor ``index``, in a per-thread scratch buffer.

        Estimators with per-element state (momentum, Adam) walk :meth:`chunks` and call this
        to rebuild z piece by piece. The result is valid until this thread's next draw:
        copy it (or fold it into an accumulator) before drawing again.
        """
        out = thread_scratch(self._scratch, length, device)
        self.generator.fill(out, seed, index, self.offsets[index] + chunk * self.chunk_len(index))
        return out

    def direction(self, seed: int, index: int) -> torch.Tensor:
        """The fp32 direction of tensor ``index`` (for tests, jvp tangents, analysis): of its
        slice, for a tensor at an offset."""
        tensor = self.tensors[index]
        flat = torch.empty(tensor.numel(), dtype=torch.float32, device=tensor.device)
        self.fill(flat, seed, index, self.offsets[index])
        return flat.view(tensor.shape)

    def fill(self, out: torch.Tensor, seed: int, index: int, start: int) -> None:
        """:meth:`DirectionGenerator.fill` over the engine's threads (top level only)."""
        if out.device.type != "cpu" or self._threads == 1:
            self.generator.fill(out, seed, index, start)
            return
        size = self.generator.job_size()
        run_jobs(
            [
                _fill_job(self.generator, out[a : a + size], seed, index, start + a)
                for a in range(0, out.numel(), size)
            ],
            self._threads,
        )

    def run_jobs(self, jobs: list[Callable[[], None]], indices: Sequence[int] | None) -> None:
        """Run per-chunk jobs for tensors ``indices`` (None = all): threaded on CPU, serial
        on an accelerator. Jobs must touch disjoint memory and draw only through :meth:`draw`."""
        targets = range(len(self.tensors)) if indices is None else indices
        if any(self.tensors[i].device.type != "cpu" for i in targets):
            for job in jobs:  # kernels are already parallel on a GPU
                job()
        else:
            run_jobs(jobs, self._threads)

    def local_part(self, index: int, whole: torch.Tensor) -> torch.Tensor:
        """What tensor ``index`` holds of ``whole`` (shaped like the whole trainable tensor):
        all of it, shaped like the tensor, or a slice's elements (from its offset on)."""
        tensor = self.tensors[index]
        start, flat = self.offsets[index], whole.reshape(-1)
        if flat.numel() < start + tensor.numel():
            raise ValueError(
                f"a {tuple(whole.shape)} tensor has no part for trainable tensor {index} "
                f"({tensor.numel()} elements from element {start})"
            )
        return flat[start : start + tensor.numel()].view(tensor.shape)

    def constant(self, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
        """A small fp32 tensor of fixed values on ``device``, created once."""
        key = (values, device)
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=torch.float32, device=device)
        return self._constants[key]

    # ------------------------------------------------------------------ updates
    def update(
        self,
        seeds: Sequence[int],
        coefficients: Sequence[float],
        decay: float = 1.0,
        indices: Sequence[int] | None = None,
    ) -> None:
        """In place: ``W <- decay * W + sum_q coefficients[q] * z(seeds[q])``.

        Accumulates in fp32 and rounds once, so low-precision weights lose as little as
        possible; a zero update (all coefficients 0, decay 1) writes nothing.
        """
        if len(seeds) != len(coefficients):
            raise ValueError("update needs one coefficient per seed")
        if all(float(c) == 0.0 for c in coefficients) and decay == 1.0:
            return
        for device, members in self._by_device(indices).items():
            values = self._coefficients(float(decay), coefficients, device)
            self._axpz_in_place(seeds, values, decay != 1.0, members)

    def update_device(
        self, seeds: Sequence[int], coefficients: torch.Tensor, indices: Sequence[int] | None = None
    ) -> None:
        """:meth:`update` with ``[decay, c_1 .. c_Q]`` as an fp32 tensor on the tensors'
        device, never read on the host (the sync-free step). Bit-identical to :meth:`update`
        given the same values."""
        for device, members in self._by_device(indices).items():
            # offloaded blocks live at home: their update reads the coefficients there
            self._axpz_in_place(seeds, coefficients.to(device), True, members)

    def updated_copy(
        self, seeds: Sequence[int], coefficients: Sequence[float], decay: float, index: int
    ) -> torch.Tensor | None:
        """What :meth:`update` would leave in tensor ``index``, bit for bit, as a new tensor
        (None when it would write nothing); the tensor itself is untouched."""
        if all(float(c) == 0.0 for c in coefficients) and decay == 1.0:
            return None
        tensor = self.tensors[index].detach()
        out = torch.empty_like(tensor)
        values = self._coefficients(float(decay), coefficients, tensor.device)
        self.axpz_at(
            [tensor.reshape(-1)], [out.view(-1)], [index], seeds, values, decay=decay != 1.0
        )
        return out

    @staticmethod
    def _coefficients(
        decay: float, coefficients: Sequence[float], device: torch.device
    ) -> torch.Tensor:
        """``[decay, c_1 .. c_Q]`` in fp32 on ``device``, sent without waiting on a stream."""
        host = torch.tensor((decay, *(float(c) for c in coefficients)), dtype=torch.float32)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    def _by_device(self, indices: Sequence[int] | None) -> dict[torch.device, list[int]]:
        groups: dict[torch.device, list[int]] = {}
        for index in range(len(self.tensors)) if indices is None else indices:
            groups.setdefault(self.tensors[index].device, []).append(index)
        return groups

    def _axpz_in_place(self, seeds, coefficients, decay: bool, indices: list[int]) -> None:
        flat = [self.tensors[i].detach().view(-1) for i in indices]
        self.axpz_at(flat, flat, indices, seeds, coefficients, decay=decay)

    def axpz_at(
        self,
        sources: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        indices: Sequence[int],
        seeds: Sequence[int],
        coefficients: torch.Tensor,
        scale: float = 1.0,
        decay: bool = False,
        starts: Sequence[int] | None = None,
    ) -> None:
        """``targets[k] = d * sources[k] + sum_q (scale * c_q) z(seeds[q], indices[k])`` over
        a slice: ``targets[k]`` (flat, a target may be its own source) holds the elements of
        tensor ``indices[k]`` from its element ``starts[k]`` on, counted in the whole tensor
        (default: :attr:`offsets`, where this engine's tensor ``indices[k]`` starts).

        ``coefficients`` is ``[d, c_1 .. c_Q]`` in fp32 on the targets' device; ``d`` applies
        only with ``decay``. Computed in fp32, rounded once: a slice gets exactly the values
        the whole tensor's pass gives those elements, wherever the slice starts."""
        if starts is None:
            starts = [self.offsets[i] for i in indices]
        with torch.no_grad():
            self.generator.axpz(
                sources, targets, indices, seeds, coefficients, scale, decay, starts
            )

    def perturbed_copy(self, seed: int, index: int, scale: float) -> torch.Tensor:
        """A new tensor ``W + scale * z`` (computed in fp32, rounded once); W untouched."""
        return self.materialize([index], seed, [scale])[index]

    def materialize(
        self,
        indices: Sequence[int],
        seed: int,
        scales: Sequence[float],
        pin_memory: bool = False,
        out: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Perturbed copies of ``indices`` (one device and dtype) in one flat buffer: ``out``
        (its first elements; the caller guarantees nothing else reads it), else a new one
        (``pin_memory``: page-locked, for host tensors bound for a CUDA device)."""
        tensors = [self.tensors[i] for i in indices]
        numel = sum(t.numel() for t in tensors)
        if out is None:
            out = torch.empty(
                numel, dtype=tensors[0].dtype, device=tensors[0].device, pin_memory=pin_memory
            )
        elif out.dtype != tensors[0].dtype or out.device != tensors[0].device:
            raise ValueError(
                f"materialize: out is {out.dtype} on {out.device}, the tensors are "
                f"{tensors[0].dtype} on {tensors[0].device}"
            )
        views = list(out[:numel].split([t.numel() for t in tensors]))
        one = self.constant((1.0, 1.0), out.device)
        by_scale: dict[float, list[int]] = {}
        for position, scale in enumerate(scales):
            by_scale.setdefault(float(scale), []).append(position)
        with torch.no_grad():
            for scale, positions in by_scale.items():
                self.axpz_at(
                    [tensors[p].detach().reshape(-1) for p in positions],
                    [views[p] for p in positions],
                    [indices[p] for p in positions],
                    [seed],
                    one,
                    scale,
                )
        return {i: v.view(t.shape) for i, v, t in zip(indices, views, tensors, strict=True)}

    # ------------------------------------------------------------------ perturbed forwards
    @contextlib.contextmanager
    def substituted(
        self, replacement: Callable[[int, torch.Tensor], torch.Tensor | None]
    ) -> Iterator[None]:
        """Forwards run inside see ``replacement(i, W_i)`` in place of trainable tensor ``i``.

        The general form of :meth:`perturbed`: forward-gradient passes dual tensors
        (``W`` with tangent ``z``) this way. ``replacement`` returning None keeps ``W``.
        The stored parameters are never modified; each module's forward gets the
        replacement only for the duration of its own call.
        """

        def swap(module: nn.Module, args) -> list[Swap]:
            restore = []
            for name, param in module._parameters.items():
                index = self.positions.get(id(param)) if param is not None else None
                if index is None:
                    continue
                new = replacement(index, param)
                if new is not None:
                    module._parameters[name] = new
                    restore.append((module, name, param))
            return restore

        def replace(indices: Sequence[int], pin_memory: bool) -> dict[int, torch.Tensor]:
            found = {i: replacement(i, self.tensors[i]) for i in indices}
            return {i: tensor for i, tensor in found.items() if tensor is not None}

        with announced(self, replace), swapping(swap, lambda module, args, output: None):
            yield

    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float | Sequence[float]) -> Iterator[None]:
        """Forwards run inside see every trainable ``W`` as ``W + scale * z(seed)``.

        ``scale`` is one number or one per tensor (per-group eps). Works for any module
        whose forward reads its own parameters; the stored weights are never modified.
        """
        scales = (
            [float(scale)] * len(self.tensors)
            if isinstance(scale, (int, float))
            else [float(s) for s in scale]
        )
        if len(scales) != len(self.tensors):
            raise ValueError("perturbed() needs one scale per tensor")
        forward = PerturbedForward(self, seed, scales)
        try:
            with announced(self, forward.replace), swapping(forward.pre, forward.post):
                yield
        finally:
            forward.close()
        if not forward.seen_set and any(scales):
            raise UnperturbedForwardError(
                "no module that owns a trainable tensor ran inside the perturbed pass (a ZO "
                "estimator's closure), so the loss cannot see the perturbation and its "
                "projected gradient would be 0. The engine perturbs a weight only inside the "
                "forward of the module that owns it: compute the loss by calling the model "
                "(e.g. model(**batch).loss), not from parameters read directly (p.sum(), "
                "p.data, a state_dict or a copy of the model)"
            )

    def output_side(self, module: nn.Module, index: int, args) -> bool:
        """Perturb through the output instead of a weight copy? Only where it is cheap."""
        return perturbs_through_output(self.config, self.tensors[index], module, args)

    def close(self) -> None:
        self.pool.clear()
        if self.prefetcher is not None:
            self.prefetcher.shutdown(wait=True)
            self.prefetcher = None

    def prefetching(self) -> bool:
        if self.config.prefetch == "auto":
            return self.device.type == "cuda"
        return self.config.prefetch == "on"


def _fill_job(generator, out, seed, index, start) -> Callable[[], None]:
    return lambda: generator.fill(out, seed, index, start)


def _require_triton() -> None:
    try:
        import zo.philox_triton  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "engine.generator=philox on CUDA draws with a Triton kernel, and triton cannot be "
            f"imported ({error}); install the triton that matches torch (CUDA builds of torch "
            "ship it), or set engine.generator=torch-blocks"
        ) from None
