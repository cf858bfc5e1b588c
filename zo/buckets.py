"""A perturbed forward's machinery: module hooks, buckets in forward order, drawing ahead.

:meth:`zo.engine.PerturbationEngine.perturbed` installs global module hooks for the duration
of a forward. Each module that reads a trainable tensor gets, for its own call only, a view
into a *bucket*: the perturbed copies of a run of tensors that the previous forward used one
after another, drawn in one generator call (one kernel on CUDA). When the forward moves on to
the next bucket it lets go of the last; on a CPU its buffer returns to the engine's pool
(:mod:`zo.buffer_pool`) and is drawn into again once nothing views it. With ``prefetch`` the
next bucket is drawn meanwhile (a CUDA side stream, or a CPU thread). Buckets never change
a value: directions are addressed by global coordinates, so any grouping draws the same
numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import nn

from zo.output_side import added_to_output, perturbed_linear, skip_matmul

if TYPE_CHECKING:
    from zo.engine import PerturbationEngine

Swap = tuple[nn.Module, str, nn.Parameter]


@contextlib.contextmanager
def swapping(pre: Callable[[nn.Module, tuple], list[Swap]], post) -> Iterator[None]:
    """Global module hooks: ``pre`` swaps a module's parameters for its call, the post hook
    puts them back (a module may be re-entered before its first call returns) and lets
    ``post`` rewrite the output. Everything is restored even when a forward raises."""
    stack: dict[int, list[list[Swap]]] = {}

    def pre_hook(module: nn.Module, args) -> None:
        stack.setdefault(id(module), []).append(pre(module, args))

    def post_hook(module: nn.Module, args, output):
        for owner, name, param in stack[id(module)].pop():
            owner._parameters[name] = param
        return post(module, args, output)

    handles = [
        nn.modules.module.register_module_forward_pre_hook(pre_hook),
        nn.modules.module.register_module_forward_hook(post_hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for entries in stack.values():  # non-empty only if a forward raised mid-way
            for restore in entries:
                for owner, name, param in restore:
                    owner._parameters[name] = param


Replace = Callable[[Sequence[int], bool], dict[int, torch.Tensor]]

ACTIVE: list[tuple[PerturbationEngine, Replace]] = []
"""The substitutions in force (innermost last): what a forward now sees in place of each
trainable tensor, for code that must move a module's weights before its call (zo.offload:
``replace(indices, pin_memory)`` gives the replaced tensors among ``indices``)."""


@contextlib.contextmanager
def announced(engine: PerturbationEngine, replace: Replace) -> Iterator[None]:
    entry = (engine, replace)
    ACTIVE.append(entry)
    try:
        yield
    finally:
        ACTIVE.remove(entry)


class Plan:
    """Buckets in forward order, learned from the forwards the engine has seen.

    A bucket is a run of tensors used one after another (same device and dtype) of at most
    ``bucket_size`` elements; its perturbed copies are drawn in one generator call. Which
    tensors share a bucket changes no value, only how many calls a forward makes.
    """

    def __init__(self, engine: PerturbationEngine):
        self.engine = engine
        self.order: list[int] = []
        self.buckets: list[list[int]] = []
        self.bucket_of: dict[int, int] = {}

    def learn(self, order: list[int]) -> None:
        if order == self.order:
            return
        self.order = list(order)
        self.buckets, self.bucket_of = [], {}
        size = 0
        for index in order:
            tensor = self.engine.tensors[index]
            if self.buckets:
                head = self.engine.tensors[self.buckets[-1][0]]
                fits = size + tensor.numel() <= self.engine.bucket_size
                same = head.device == tensor.device and head.dtype == tensor.dtype
            if not self.buckets or not (fits and same):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(index)
            self.bucket_of[index] = len(self.buckets) - 1
            size += tensor.numel()
            self.engine.pool.reserve(size, tensor.dtype, tensor.device)


class PerturbedForward:
    """One :meth:`PerturbationEngine.perturbed` context: buckets drawn on demand."""

    def __init__(self, engine: PerturbationEngine, seed: int, scales: list[float]):
        self.engine, self.seed, self.scales = engine, seed, scales
        self.live: dict[int, dict[int, torch.Tensor]] = {}  # bucket -> perturbed views
        self.ahead: tuple[int, object] | None = None  # (bucket, future or event+views)
        self.seen: list[int] = []
        self.seen_set: set[int] = set()
        # per module, a stack of (index, None) for an added output-side perturbation or
        # (index, (weight, bias)) for a perturbed matmul; None for neither
        self.output_side: dict[int, list[tuple[int, tuple | None] | None]] = {}

    # ------------------------------------------------------------------ hooks
    def pre(self, module: nn.Module, args) -> list[Swap]:
        engine = self.engine
        restore, output_side = [], None
        for name, param in module._parameters.items():
            index = engine.positions.get(id(param)) if param is not None else None
            if index is None:
                continue
            if index not in self.seen_set:
                self.seen_set.add(index)
                if not engine.output_side(module, index, args):
                    self.seen.append(index)
            if self.scales[index] == 0.0:
                continue
            if engine.output_side(module, index, args):
                output_side = index
                continue
            module._parameters[name] = self._perturbed(module, index)
            restore.append((module, name, param))
        through = None if output_side is None else (output_side, None)
        if through is not None and isinstance(module, nn.Linear) and not torch.is_grad_enabled():
            through = (output_side, skip_matmul(module, restore))
        self.output_side.setdefault(id(module), []).append(through)
        return restore

    def post(self, module: nn.Module, args, output):
        through = self.output_side[id(module)].pop()
        if through is None:
            return None
        index, linear = through
        if linear is not None:
            weight, bias = linear
            return perturbed_linear(
                self.engine, weight, args[0], bias, self.seed, self.scales[index], output.dtype
            )
        return added_to_output(self.engine, module, args, output, self.seed, self.scales[index])

    def replace(self, indices: Sequence[int], pin_memory: bool) -> dict[int, torch.Tensor]:
        """Perturbed copies of ``indices`` drawn now, for a caller that hands them to their
        modules itself (the modules then hold tensors this engine does not know, and skip it):
        counted as seen, never planned into buckets."""
        self.seen_set.update(indices)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index in indices:
            if self.scales[index] != 0.0:
                by_dtype.setdefault(self.engine.tensors[index].dtype, []).append(index)
        copies: dict[int, torch.Tensor] = {}
        for members in by_dtype.values():
            scales = [self.scales[i] for i in members]
            out = None if pin_memory else self._buffer(members)
            copies.update(self.engine.materialize(members, self.seed, scales, pin_memory, out))
        return copies

    # ------------------------------------------------------------------ buckets
    def _perturbed(self, module: nn.Module, index: int) -> torch.Tensor:
        live = self._live_view(index)
        if live is not None:
            return live
        plan = self.engine.plan
        bucket = plan.bucket_of.get(index)
        # Earlier buckets are done: let go of them before drawing, so that the pool can hand
        # their buffer out again (it will not while a module still holds a view of it).
        self.live = {}
        if bucket is None:  # not seen in earlier forwards: this module's tensors alone
            members = self._module_members(module)
            self.live = {-1 - index: self._draw(members)}
            return self.live[-1 - index][index]
        views = self._take_ahead(bucket)
        if views is None:
            views = self._draw(self._members(bucket))
        self.live = {bucket: views}
        self._start_ahead(bucket + 1)
        return views[index]

    def _live_view(self, index: int) -> torch.Tensor | None:
        """Tensor ``index``'s view in a live bucket (a function of its own: a loop variable
        left in :meth:`_perturbed`'s frame would hold the last bucket while the next is drawn,
        and the pool would allocate another buffer)."""
        for views in self.live.values():
            if index in views:
                return views[index]
        return None

    def _members(self, bucket: int) -> list[int]:
        return [i for i in self.engine.plan.buckets[bucket] if self.scales[i] != 0.0]

    def _module_members(self, module: nn.Module) -> list[int]:
        engine, members = self.engine, []
        for param in module._parameters.values():
            index = engine.positions.get(id(param)) if param is not None else None
            if index is not None and self.scales[index] != 0.0 and index not in members:
                members.append(index)
        first = engine.tensors[members[0]]
        return [i for i in members if engine.tensors[i].dtype == first.dtype]

    def _buffer(self, members: list[int]) -> torch.Tensor:
        """A buffer from the engine's pool for ``members``' copies (taken on this thread: the
        pool is not shared with the prefetch worker)."""
        tensors = [self.engine.tensors[i] for i in members]
        numel = sum(t.numel() for t in tensors)
        return self.engine.pool.take(numel, tensors[0].dtype, tensors[0].device)

    def _draw(self, members: list[int], out: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        scales = [self.scales[i] for i in members]
        out = self._buffer(members) if out is None else out
        return self.engine.materialize(members, self.seed, scales, out=out)

    def _start_ahead(self, bucket: int) -> None:
        engine = self.engine
        if not engine.prefetching() or bucket >= len(engine.plan.buckets):
            return
        members = self._members(bucket)
        if not members:
            return
        if engine.device.type == "cuda":
            main = torch.cuda.current_stream(engine.device)
            side = _side_stream(engine.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                views = self._draw(members)
                done = torch.cuda.Event()
                done.record(side)
            self.ahead = (bucket, (views, done))
        else:
            if engine.prefetcher is None:
                engine.prefetcher = ThreadPoolExecutor(1, thread_name_prefix="zo-prefetch")
            job = _DrawAhead(self, members, self._buffer(members))
            self.ahead = (bucket, job.start(engine.prefetcher))

    def _take_ahead(self, bucket: int) -> dict[int, torch.Tensor] | None:
        if self.ahead is None or self.ahead[0] != bucket:
            self._drop_ahead()
            return None
        _, pending = self.ahead
        self.ahead = None
        if isinstance(pending, _DrawAhead):
            return pending.take()
        views, done = pending
        main = torch.cuda.current_stream(self.engine.device)
        main.wait_event(done)
        for view in views.values():  # allocated on the side stream, used on this one
            view.record_stream(main)
        return views

    def _drop_ahead(self) -> None:
        if self.ahead is not None and isinstance(self.ahead[1], _DrawAhead):
            self.ahead[1].take()  # let the worker finish before its buffers go
        self.ahead = None

    def close(self) -> None:
        self._drop_ahead()
        self.live = {}
        self.engine.plan.learn(self.seen)
        # The pool lives for one forward: between forwards its buffers would stay resident
        # through whatever the step does next (a first-order backward: +19 MiB measured on
        # hybrid's peak), at the price of one allocation per forward instead of per bucket.
        self.engine.pool.clear()


class _DrawAhead:
    """A bucket drawn on the CPU prefetch thread into a buffer the forward took from the pool.

    The job hands its buffer and views over and keeps no reference to either: the executor's
    worker holds a job for a while after it ran (longer on a loaded machine), and a view held
    there would make the pool see the buffer busy and allocate another."""

    def __init__(self, forward: PerturbedForward, members: list[int], buffer: torch.Tensor):
        self.forward, self.members = forward, members
        self.buffer: torch.Tensor | None = buffer
        self.views: dict[int, torch.Tensor] = {}
        self.future: Future = Future()

    def start(self, executor: ThreadPoolExecutor) -> _DrawAhead:
        self.future = executor.submit(self._run)
        return self

    def _run(self) -> None:
        buffer, self.buffer = self.buffer, None
        self.views = self.forward._draw(self.members, buffer)

    def take(self) -> dict[int, torch.Tensor]:
        """The drawn views, once drawn (re-raises what the drawing raised)."""
        self.future.result()
        views, self.views = self.views, {}
        return views


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]
