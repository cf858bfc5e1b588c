"""Seed-replay perturbation engine: the only owner of randomness for directions.

Every zeroth-order estimator is a sequence of passes over the trainable tensors that
add ``scale * z`` to them, where ``z`` is regenerated from a seed and never stored.

* Seeds. A step seed is ``mix_seed(run_seed, step, query)``. Chunk ``c`` of tensor ``i``
  draws from its own ``torch.Generator`` seeded with ``mix_seed(step_seed, i, c)``, so a
  chunk's values depend on nothing but those numbers: serial and threaded generation
  are bit-identical, and no global RNG is touched.
* Memory. Directions are drawn one fixed-size chunk at a time, so the temporary is a
  chunk, not the largest tensor.
* Exact restore. Perturbations are *functional*: while a forward runs inside
  :meth:`PerturbationEngine.perturbed`, each module that owns a trainable tensor sees
  ``W + scale * z`` computed on the fly, and the stored ``W`` is never written. Restoring
  is therefore free and bit-exact in every dtype, and a two-point step costs three
  passes over the weights (two perturbed forwards and one update), not four.
* Large embeddings and output heads are not copied: their perturbation is added to the
  module's output (``z`` rows gathered for an embedding, ``x @ z.T`` for a linear layer),
  chunk by chunk, so a perturbed forward needs no more memory than a plain one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ENGINE_VERSION = "1"

_MASK64 = (1 << 64) - 1


def splitmix64(value: int) -> int:
    """One round of the splitmix64 finaliser: a cheap, well-mixed 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """Fold integers into one 63-bit seed; order matters, collisions are negligible."""
    state = 0x5A4F2D454E47494E  # "ZO-ENGIN": keeps mix_seed(0) away from splitmix64(0)
    for part in parts:
        state = splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1  # torch.Generator.manual_seed takes any non-negative int < 2**64


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


def _fill_gaussian(out: torch.Tensor, generator: torch.Generator) -> None:
    out.normal_(generator=generator)


def _fill_rademacher(out: torch.Tensor, generator: torch.Generator) -> None:
    out.random_(0, 2, generator=generator).mul_(2).sub_(1)


DISTRIBUTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], None]] = {
    "gaussian": _fill_gaussian,
    "rademacher": _fill_rademacher,
}


@dataclass(frozen=True)
class EngineConfig:
    """How directions are drawn. Changing any field changes every direction."""

    chunk_size: int = 0
    """Elements per chunk; the per-draw temporary is one chunk of fp32. 0 = by device:
    2**20 on CPU (4 MiB), 2**22 on accelerators (16 MiB), where chunks cost launches."""
    threads: int = 0
    """Worker threads drawing chunks on CPU; 0 = one per intra-op thread (max 8)."""
    distribution: str = "gaussian"
    """Direction law: ``gaussian`` or ``rademacher`` (both have E[z z^T] = I)."""
    offload_threshold: int = 1 << 22
    """Embedding / linear weights above this many elements get the output-side
    perturbation instead of a perturbed copy (saves one weight-sized temporary)."""
    offload_max_rows: int = 64
    """A large linear layer is perturbed output-side only when its input has at most this
    many rows (the LM head at scored positions); beyond, the extra matmul costs more."""

    def __post_init__(self) -> None:
        if self.chunk_size < 0:
            raise ValueError(f"engine.chunk_size must be >= 0 (0 = auto), got {self.chunk_size}")
        if self.threads < 0:
            raise ValueError(f"engine.threads must be >= 0, got {self.threads}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"engine.distribution {self.distribution!r} is unknown; "
                f"choose one of {sorted(DISTRIBUTIONS)}"
            )


class FrozenTensorError(RuntimeError):
    """Raised when something asks the engine to perturb a tensor it must not touch."""


CPU_CHUNK = 1 << 20
ACCELERATOR_CHUNK = 1 << 22

_PERTURBABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class PerturbationEngine:
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
        """Perturb through the output instead of a weight copy? Only where it is cheap.

        An embedding gathers a few rows of z; a linear layer pays an extra matmul of its
        input rows with z, cheap only for few rows (the LM head at scored positions) --
        for a full sequence, copying the weight costs less time than the matmul.
        """
        weight = self.tensors[index]
        if (
            weight.numel() <= self.config.offload_threshold
            or module._parameters.get("weight") is not weight
        ):
            return False
        if type(module).forward is nn.Embedding.forward:
            return module.max_norm is None
        if type(module).forward is nn.Linear.forward and args:
            rows = args[0].numel() // max(1, args[0].shape[-1])
            return rows <= self.config.offload_max_rows
        return False

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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
