"""The version-1 engine, kept whole so that runs it trained keep replaying bit for bit.

Version 1 drew chunk ``c`` of tensor ``i`` from a ``torch.Generator`` seeded with
``mix_seed(step_seed, i, c)``, with row-aligned chunks of ``EngineConfig.chunk_size``
(so its directions depend on the chunk size), and applied perturbations one weight-sized
copy at a time. Trajectories whose header says ``engine_version: "1"`` (or
``generator: torch-chunks-v1``) are resumed and replayed with this class, selected by
:func:`zo.engine.build_engine`; new runs use :class:`zo.engine.PerturbationEngine`.
Only :meth:`EngineV1.update_device` is new: the device-coefficient update that version 2's
sync-free step calls, done here by reading the coefficients first.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from zo.directions import mix_seed
from zo.engine_config import (
    ACCELERATOR_CHUNK,
    CPU_CHUNK,
    LEGACY_GENERATOR,
    EngineConfig,
    FrozenTensorError,
    perturbs_through_output,
)
from zo.engine_config import PERTURBABLE_DTYPES as _PERTURBABLE_DTYPES


def _fill_gaussian(out: torch.Tensor, generator: torch.Generator) -> None:
    out.normal_(generator=generator)


def _fill_rademacher(out: torch.Tensor, generator: torch.Generator) -> None:
    out.random_(0, 2, generator=generator).mul_(2).sub_(1)


DISTRIBUTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], None]] = {
    "gaussian": _fill_gaussian,
    "rademacher": _fill_rademacher,
}


class EngineV1:
    """Draws seed-addressed directions over a fixed list of tensors and applies them.

    The tensor order is part of the seed address: tensor ``i`` of a run always draws
    with index ``i``. Keep the list (the trainable set's manifest) stable to replay.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.tensors = list(tensors)
        for index, tensor in enumerate(self.tensors):
            if tensor.dtype not in _PERTURBABLE_DTYPES:
                raise FrozenTensorError(
                    f"trainable tensor {index} has dtype {tensor.dtype}; the engine perturbs "
                    "only floating-point tensors (a quantized base stays frozen: train a "
                    "sparse delta or LoRA over it instead)"
                )
        self._index = {id(t): i for i, t in enumerate(self.tensors)}
        if len(self._index) != len(self.tensors):
            raise ValueError("the same tensor appears twice in the trainable set")
        self._fill = DISTRIBUTIONS[self.config.distribution]
        threads = self.config.threads or min(8, torch.get_num_threads())
        self._threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._scratch = threading.local()

    # ------------------------------------------------------------------ directions
    def num_chunks(self, index: int) -> int:
        numel = self.tensors[index].numel()
        return max(1, -(-numel // self._chunk_len(index)))

    def _chunk_len(self, index: int) -> int:
        # Row-aligned chunks for matrices, so an embedding can gather rows chunk by chunk.
        tensor = self.tensors[index]
        if tensor.dim() >= 2:
            row = tensor[0].numel()
            return max(1, self._chunk_size(index) // row) * row
        return self._chunk_size(index)

    def _chunk_size(self, index: int) -> int:
        if self.config.chunk_size:
            return self.config.chunk_size
        return CPU_CHUNK if self.tensors[index].device.type == "cpu" else ACCELERATOR_CHUNK

    def draw(self, seed: int, index: int, chunk: int, length: int, device) -> torch.Tensor:
        """Chunk ``chunk`` of z for tensor ``index``, in a per-thread scratch buffer.

        Estimators with per-element state (momentum, Adam) walk :meth:`chunks` and call this
        to rebuild z piece by piece. The result is valid until this thread's next draw:
        copy it (or fold it into an accumulator) before drawing again. Reusing one buffer per thread
        keeps the allocator from growing a fresh chunk-sized block in every thread arena.
        """
        device = torch.device(device)
        local = self._scratch.__dict__.setdefault(device, {})
        if "generator" not in local:  # creating a CUDA generator per chunk is slow
            local["generator"] = torch.Generator(device=device)
        generator = local["generator"]
        generator.manual_seed(mix_seed(seed, index, chunk))
        scratch = local.get("buffer")
        if scratch is None or scratch.numel() < length:
            scratch = local["buffer"] = torch.empty(length, dtype=torch.float32, device=device)
        out = scratch[:length]
        self._fill(out, generator)
        return out

    def chunks(self, index: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(chunk, start, stop)`` over the flat view of tensor ``index``."""
        numel = self.tensors[index].numel()
        step = self._chunk_len(index)
        for chunk, start in enumerate(range(0, max(numel, 1), step)):
            yield chunk, start, min(start + step, numel)

    def local_part(self, index: int, whole: torch.Tensor) -> torch.Tensor:
        """``whole`` shaped like tensor ``index`` (version 1 draws whole tensors only)."""
        return whole.view(self.tensors[index].shape)

    def direction(self, seed: int, index: int) -> torch.Tensor:
        """The full fp32 direction of tensor ``index`` (for tests, jvp tangents, analysis)."""
        tensor = self.tensors[index]
        flat = torch.empty(tensor.numel(), dtype=torch.float32, device=tensor.device)
        for chunk, start, stop in self.chunks(index):
            flat[start:stop] = self.draw(seed, index, chunk, stop - start, tensor.device)
        return flat.view(tensor.shape)

    def _run(self, jobs: list[Callable[[], None]]) -> None:
        """Run chunk jobs; on CPU spread them over a thread pool (results are order-free)."""
        if len(jobs) <= 1 or self._threads == 1:
            for job in jobs:
                job()
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="zo-engine")
        for future in [self._pool.submit(job) for job in jobs]:
            future.result()

    def _on_gpu(self, index: int) -> bool:
        return self.tensors[index].device.type != "cpu"

    # ------------------------------------------------------------------ updates
    def update(
        self,
        seeds: Sequence[int],
        coefficients: Sequence[float],
        decay: float = 1.0,
        indices: Sequence[int] | None = None,
    ) -> None:
        """In place: ``W <- decay * W + sum_q coefficients[q] * z(seeds[q])``.

        Accumulates in fp32 per chunk and rounds once, so low-precision weights lose as
        little as possible; a zero update (all coefficients 0, decay 1) writes nothing.
        """
        if len(seeds) != len(coefficients):
            raise ValueError("update needs one coefficient per seed")
        terms = [(s, float(c)) for s, c in zip(seeds, coefficients, strict=True) if c != 0.0]
        if not terms and decay == 1.0:
            return
        jobs: list[Callable[[], None]] = []
        for index in range(len(self.tensors)) if indices is None else indices:
            flat = self.tensors[index].detach().view(-1)
            for chunk, start, stop in self.chunks(index):
                jobs.append(self._update_job(flat, index, chunk, start, stop, terms, decay))
        self.run_jobs(jobs, indices)

    def run_jobs(self, jobs: list[Callable[[], None]], indices: Sequence[int] | None) -> None:
        """Run per-chunk jobs for tensors ``indices`` (None = all): threaded on CPU, serial
        on an accelerator. Jobs must touch disjoint memory and draw only through :meth:`draw`."""
        targets = range(len(self.tensors)) if indices is None else indices
        if any(self._on_gpu(i) for i in targets):
            for job in jobs:  # kernels are already parallel on a GPU
                job()
        else:
            self._run(jobs)

    def _update_job(self, flat, index, chunk, start, stop, terms, decay) -> Callable[[], None]:
        def job() -> None:
            piece = flat[start:stop]
            acc = piece if piece.dtype == torch.float32 else piece.float()
            if decay != 1.0:
                acc.mul_(decay)
            for seed, coefficient in terms:
                z = self.draw(seed, index, chunk, stop - start, flat.device)
                acc.add_(z, alpha=coefficient)
            if acc is not piece:
                piece.copy_(acc)

        return job

    def perturbed_copy(self, seed: int, index: int, scale: float) -> torch.Tensor:
        """A new tensor ``W + scale * z`` (computed in fp32, rounded once); W untouched."""
        tensor = self.tensors[index].detach()
        out = torch.empty_like(tensor)
        source, target = tensor.reshape(-1), out.view(-1)

        def make_job(chunk: int, start: int, stop: int) -> Callable[[], None]:
            def job() -> None:
                z = self.draw(seed, index, chunk, stop - start, tensor.device)
                piece = source[start:stop]
                if piece.dtype == torch.float32:
                    torch.add(piece, z, alpha=scale, out=target[start:stop])
                else:
                    target[start:stop].copy_(piece.float().add_(z, alpha=scale))

            return job

        self.run_jobs([make_job(*c) for c in self.chunks(index)], [index])
        return out

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
        stack: dict[int, list[list[tuple[nn.Module, str, nn.Parameter]]]] = {}

        def pre_hook(module: nn.Module, args) -> None:
            restore = []
            for name, param in module._parameters.items():
                index = self._index.get(id(param)) if param is not None else None
                if index is None:
                    continue
                new = replacement(index, param)
                if new is not None:
                    module._parameters[name] = new
                    restore.append((module, name, param))
            stack.setdefault(id(module), []).append(restore)

        def post_hook(module: nn.Module, args, output) -> None:
            for owner, name, param in stack[id(module)].pop():
                owner._parameters[name] = param

        pre = nn.modules.module.register_module_forward_pre_hook(pre_hook)
        post = nn.modules.module.register_module_forward_hook(post_hook)
        try:
            yield
        finally:
            pre.remove()
            post.remove()
            for entries in stack.values():  # non-empty only if a forward raised mid-way
                for restore in entries:
                    for owner, name, param in restore:
                        owner._parameters[name] = param

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
        # Per module, a stack of (swapped parameters, output-side tensor index) entries:
        # a module may be re-entered before its first call returns.
        swapped: dict[int, list[tuple[list[tuple[nn.Module, str, nn.Parameter]], int | None]]] = {}

        def pre_hook(module: nn.Module, args) -> None:
            restore, output_side = [], None
            for name, param in module._parameters.items():
                index = self._index.get(id(param)) if param is not None else None
                if index is None or scales[index] == 0.0:
                    continue
                if self._output_side(module, index, args):
                    output_side = index
                    continue
                module._parameters[name] = self.perturbed_copy(seed, index, scales[index])
                restore.append((module, name, param))
            swapped.setdefault(id(module), []).append((restore, output_side))

        def post_hook(module: nn.Module, args, output):
            restore, output_side = swapped[id(module)].pop()
            for owner, name, param in restore:
                owner._parameters[name] = param
            if output_side is None:
                return None
            return self._output_side_perturbation(module, args, output, seed, scales[output_side])

        pre = nn.modules.module.register_module_forward_pre_hook(pre_hook)
        post = nn.modules.module.register_module_forward_hook(post_hook)
        try:
            yield
        finally:
            pre.remove()
            post.remove()
            for stack in swapped.values():  # non-empty only if a forward raised mid-way
                for restore, _ in stack:
                    for owner, name, param in restore:
                        owner._parameters[name] = param

    def _output_side(self, module: nn.Module, index: int, args) -> bool:
        """Perturb through the output instead of a weight copy? Only where it is cheap."""
        return perturbs_through_output(self.config, self.tensors[index], module, args)

    def _output_side_perturbation(self, module, args, output, seed, scale: float):
        """Add the perturbation's effect to a large embedding's or linear layer's output.

        Chunks are row blocks of the weight; each job writes disjoint output rows
        (embedding) or columns (linear), so jobs run on the thread pool safely.
        """
        weight = module._parameters["weight"]
        index, row = self._index[id(weight)], weight.shape[1]
        output = output.clone() if output.requires_grad else output
        jobs: list[Callable[[], None]] = []
        if isinstance(module, nn.Embedding):
            out_rows = output.view(-1, row)
            flat_ids = args[0].reshape(-1)
            for chunk, start, stop in self.chunks(index):
                first, last = start // row, stop // row
                hit = (flat_ids >= first) & (flat_ids < last)
                # On CPU skip untouched chunks; on a GPU that test would sync every chunk.
                positions = hit.nonzero().view(-1) if out_rows.device.type == "cpu" else None
                if positions is None or positions.numel():
                    jobs.append(
                        self._embedding_job(
                            out_rows,
                            flat_ids,
                            positions,
                            (seed, index, chunk, stop - start),
                            first,
                            scale,
                        )
                    )
        else:
            out_cols = output.view(-1, output.shape[-1])
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            for chunk, start, stop in self.chunks(index):
                jobs.append(
                    self._linear_job(
                        out_cols,
                        x,
                        (seed, index, chunk, stop - start),
                        start // row,
                        stop // row,
                        scale,
                    )
                )
        self.run_jobs(jobs, [index])
        return output

    def _embedding_job(self, out_rows, flat_ids, positions, address, first, scale):
        def job() -> None:
            block = self._chunk_rows(*address, out_rows.device)
            if positions is not None:
                rows = block[flat_ids[positions] - first]
                out_rows.index_add_(0, positions, rows.to(out_rows.dtype), alpha=scale)
                return
            local = flat_ids - first
            hit = (local >= 0) & (local < block.shape[0])
            rows = block[local.clamp(0, block.shape[0] - 1)] * hit.unsqueeze(1)
            out_rows.add_(rows.to(out_rows.dtype), alpha=scale)

        return job

    def _linear_job(self, out_cols, x, address, first, last, scale):
        def job() -> None:
            block = self._chunk_rows(*address, out_cols.device)
            out_cols[:, first:last] += (scale * F.linear(x, block)).to(out_cols.dtype)

        return job

    def _chunk_rows(self, seed: int, index: int, chunk: int, length: int, device) -> torch.Tensor:
        """Chunk ``chunk`` of tensor ``index``'s direction as a block of weight rows."""
        row = self.tensors[index][0].numel()
        return self.draw(seed, index, chunk, length, device).view(-1, row)

    generator_name = LEGACY_GENERATOR

    def updated_copy(
        self, seeds: Sequence[int], coefficients: Sequence[float], decay: float, index: int
    ) -> torch.Tensor | None:
        """What :meth:`update` would leave in tensor ``index``, bit for bit, as a new tensor
        (version 1's arithmetic: ``add_(z, alpha=c)`` per chunk in fp32)."""
        terms = [(s, float(c)) for s, c in zip(seeds, coefficients, strict=True) if c != 0.0]
        if not terms and decay == 1.0:
            return None
        tensor = self.tensors[index].detach()
        out = torch.empty_like(tensor)
        source, target = tensor.reshape(-1), out.view(-1)

        def make_job(chunk: int, start: int, stop: int) -> Callable[[], None]:
            def job() -> None:
                acc = source[start:stop].to(torch.float32, copy=True)
                if decay != 1.0:
                    acc.mul_(decay)
                for seed, coefficient in terms:
                    acc.add_(
                        self.draw(seed, index, chunk, stop - start, acc.device), alpha=coefficient
                    )
                target[start:stop].copy_(acc)

            return job

        self.run_jobs([make_job(*c) for c in self.chunks(index)], [index])
        return out

    def update_device(
        self, seeds: Sequence[int], coefficients: torch.Tensor, indices: Sequence[int] | None = None
    ) -> None:
        """``update`` with ``[decay, c_1 .. c_Q]`` in a tensor: read here (version 1 syncs)."""
        decay, *values = coefficients.tolist()
        self.update(seeds, values, decay, indices)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
