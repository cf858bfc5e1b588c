"""Offloaded ZO: decoder blocks live in host memory and visit the device a block at a time.

ZO keeps no gradients and no optimizer state, so a model that does not fit on the device
can train if its blocks stay on the host (``home``) and each block's weights are on the
device only around that block's call. The perturbation engine works on the weights where
they live: the perturbed copy ``W + eps z`` of a block is drawn at home from the seed and
copied over; the update is applied at home. Nothing but activations, the weights outside the
blocks and ``k + 1`` blocks' weights (``prefetch`` = k) occupies the device, from loading on:
:func:`offload_blocks` takes the model as loaded, on the host, and moves only the rest.

Three parts, one idea each:
- :class:`Schedule` (pure): which block is fetched, waited for and released when. While
  block ``b`` computes, blocks ``b+1 .. b+k`` are being copied; block ``b+k+1`` goes into
  the slot of block ``b`` once ``b`` is done, so at most ``k + 1`` blocks are resident.
- a transfer backend: :class:`StreamCopies` on CUDA (pinned host memory, the copies on a
  side stream, events so that no block computes before its copy lands and no slot is
  overwritten before its block's compute is done), :class:`HostCopies` on a CPU device
  (the host is the device: a plain copy into the slot, the same code path without streams).
- :class:`Offloaded`: block hooks that run the schedule. A block's pre-hook swaps each of its
  modules' parameters for views into the block's slot before any of them runs, so the
  engine's global hooks see tensors they do not own and leave them be; what the slot holds
  is what the engine would have given those modules (the active substitution's
  ``replace``: :data:`zo.buckets.ACTIVE`). The post-hook puts the home tensors back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from zo import buckets
from zo.blocks import decoder_blocks
from zo.config import ConfigError

__all__ = [
    "Action",
    "HostCopies",
    "OffloadError",
    "Offloaded",
    "Schedule",
    "StreamCopies",
    "check_offloaded_run",
    "offload_blocks",
]


# ---------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class Action:
    """``fetch`` a block into its slot, ``wait`` until it landed, ``release`` its slot."""

    kind: str
    block: int


@dataclass
class Schedule:
    """Blocks ``0 .. blocks-1`` visited in order, ``prefetch`` (k) of them ahead of the one
    computing. Pure bookkeeping: it says what to do; a backend does it."""

    blocks: int
    prefetch: int = 1
    resident: list[int] = field(default_factory=list)
    """Fetched and not yet released, in fetch order (at most ``slots``)."""
    last: int | None = None

    def __post_init__(self) -> None:
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (blocks copied ahead), got {self.prefetch}")

    @property
    def slots(self) -> int:
        return min(self.prefetch + 1, self.blocks)

    def slot(self, block: int) -> int:
        return block % self.slots

    def enter(self, block: int, fresh: bool = False) -> list[Action]:
        """Block ``block`` is about to compute. A pass that does not continue the last one
        (``fresh``: the weights it should see changed; or a block out of order) starts
        afresh: whatever was fetched ahead is released unused."""
        actions = []
        if fresh or self.last is None or block != self.last + 1:
            actions += [Action("release", b) for b in self.resident]
            self.resident = []
        for ahead in range(block, min(block + self.prefetch, self.blocks - 1) + 1):
            if ahead not in self.resident:
                actions.append(Action("fetch", ahead))
                self.resident.append(ahead)
        actions.append(Action("wait", block))
        self.last = block
        return actions

    def leave(self, block: int) -> list[Action]:
        """Block ``block`` has computed (or raised): its slot may take the next block."""
        if block not in self.resident:
            return []
        self.resident.remove(block)
        if block == self.blocks - 1:
            self.last = None  # the pass is over: the next one starts afresh
        return [Action("release", block)]


# ---------------------------------------------------------------------- transfer backends
Copy = tuple[torch.Tensor, torch.Tensor]  # (slot view, home source)


class Copies(Protocol):
    """Moves one block's tensors into a slot on the device, and orders slot reuse."""

    device: torch.device
    pin_memory: bool

    def fetch(self, slot: int, copies: Sequence[Copy]) -> None: ...
    def wait(self, slot: int) -> None: ...
    def release(self, slot: int) -> None: ...


class HostCopies:
    """The host is the device: each copy happens at once (no streams), so fetch, wait and
    release need no ordering; the copy into the slot still crosses a (simulated) boundary."""

    pin_memory = False

    def __init__(self, device: torch.device):
        self.device = device

    def fetch(self, slot: int, copies: Sequence[Copy]) -> None:
        for view, source in copies:
            view.copy_(source)

    def wait(self, slot: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass


class StreamCopies:
    """CUDA: copies from pinned host memory on a side stream, overlapping the compute on the
    current stream. Per slot, ``landed`` (recorded on the side stream after the copy; the
    compute stream waits on it) and ``done`` (recorded on the compute stream after the
    block; the next copy into the slot waits on it). Slots are allocated once and never
    freed, so no ``record_stream`` is needed for them; a pinned source freed after its copy
    is kept by torch's host allocator until the copy's stream passes it."""

    pin_memory = True

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.landed = [torch.cuda.Event() for _ in range(slots)]
        self.done = [torch.cuda.Event() for _ in range(slots)]

    def fetch(self, slot: int, copies: Sequence[Copy]) -> None:
        self.stream.wait_event(self.done[slot])  # the slot's last block has computed
        with torch.cuda.stream(self.stream):
            for view, source in copies:
                if not source.is_pinned():  # a pageable copy would hold the host
                    source = source.pin_memory()
                view.copy_(source, non_blocking=True)
            self.landed[slot].record(self.stream)

    def wait(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.landed[slot])

    def release(self, slot: int) -> None:
        self.done[slot].record(torch.cuda.current_stream(self.device))


# ---------------------------------------------------------------------- block hooks
Entry = tuple[nn.Module, str, nn.Parameter]  # (module, parameter name, home tensor)


class Offloaded:
    """Hooks that stream ``blocks``' parameters from home into ``k + 1`` device slots.

    ``copies`` counts the tensors copied (blocks fetched times their tensors).
    """

    def __init__(self, blocks: Sequence[nn.Module], backend: Copies, prefetch: int = 1):
        self.backend = backend
        self.schedule = Schedule(len(blocks), prefetch)
        self.entries: list[list[Entry]] = []
        sizes: dict[torch.dtype, int] = {}
        for block in blocks:
            entries = [
                (module, name, param)
                for module in block.modules()
                for name, param in module._parameters.items()
                if param is not None
            ]
            self.entries.append(entries)
            per_dtype: dict[torch.dtype, int] = {}
            for _, _, param in entries:
                per_dtype[param.dtype] = per_dtype.get(param.dtype, 0) + _aligned(param)
            for dtype, numel in per_dtype.items():
                sizes[dtype] = max(sizes.get(dtype, 0), numel)
        self.slots = [
            {
                dtype: torch.empty(numel, dtype=dtype, device=backend.device)
                for dtype, numel in sizes.items()
            }
            for _ in range(self.schedule.slots)
        ]
        self.copies = 0
        self._context: tuple = ()
        self._handles = []
        for index, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(index)))
            self._handles.append(block.register_forward_hook(self._post(index), always_call=True))

    # ------------------------------------------------------------------ hooks
    def _pre(self, index: int):
        def hook(block: nn.Module, args) -> None:
            context = tuple(buckets.ACTIVE)
            fresh = len(context) != len(self._context) or any(
                a is not b for a, b in zip(context, self._context, strict=False)
            )
            self._context = context
            self.run(self.schedule.enter(index, fresh))
            for (module, name, _), view in zip(
                self.entries[index], self._views(index), strict=True
            ):
                module._parameters[name] = view

        return hook

    def _post(self, index: int):
        def hook(block: nn.Module, args, output) -> None:
            for module, name, param in self.entries[index]:
                module._parameters[name] = param
            self.run(self.schedule.leave(index))

        return hook

    def run(self, actions: Sequence[Action]) -> None:
        for action in actions:
            slot = self.schedule.slot(action.block)
            if action.kind == "fetch":
                self._fetch(slot, action.block)
            elif action.kind == "wait":
                self.backend.wait(slot)
            else:
                self.backend.release(slot)

    def _fetch(self, slot: int, block: int) -> None:
        """Copy ``block`` into ``slot``. Its sources (perturbed copies from the engine's
        buffer pool) are let go on return, before the next block's are drawn, so the pool
        can hand the same buffer out again."""
        copies = list(zip(self._views(block), self._sources(block), strict=True))
        self.backend.fetch(slot, copies)
        self.copies += len(copies)

    # ------------------------------------------------------------------ what a slot holds
    def _views(self, block: int) -> list[torch.Tensor]:
        slot = self.slots[self.schedule.slot(block)]
        offsets: dict[torch.dtype, int] = {}
        views = []
        for _, _, param in self.entries[block]:
            start = offsets.get(param.dtype, 0)
            offsets[param.dtype] = start + _aligned(param)
            view = slot[param.dtype][start : start + param.numel()].view(param.shape)
            views.append(view)
        return views

    def _sources(self, block: int) -> list[torch.Tensor]:
        """What each tensor of ``block`` should be seen as now: the home tensor, or what the
        substitution in force gives for it (the outermost claims it, as the engine's hooks
        run outermost first)."""
        replaced: dict[int, torch.Tensor] = {}
        params = [param for _, _, param in self.entries[block]]
        for engine, replace in buckets.ACTIVE:
            owned = {
                engine.positions[id(p)]: p
                for p in params
                if id(p) in engine.positions and id(p) not in replaced
            }
            if owned:
                for position, copy in replace(list(owned), self.backend.pin_memory).items():
                    replaced[id(owned[position])] = copy
        return [replaced.get(id(p), p).detach() for p in params]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _aligned(param: torch.Tensor) -> int:
    """Elements ``param`` takes in a slot: each view starts 256 bytes after the last, so
    kernels see the alignment (and pick the algorithms) they would on a tensor of its own."""
    per = max(1, 256 // param.element_size())
    return -(-param.numel() // per) * per


_told_host_is_device = False


def offload_blocks(
    model: nn.Module, device: torch.device, prefetch: int = 1, streams: str = "auto"
) -> Offloaded:
    """Keep ``model``'s decoder blocks at home and stream them to ``device``, ``prefetch``
    blocks ahead; the rest (embeddings, norm, head, the blocks' buffers) goes to ``device``.

    ``model`` may be anywhere: as loaded, on the host (its blocks' weights never reach the
    device, so a model larger than the device trains), or on ``device`` already (its
    blocks' weights are moved home).

    ``streams``: ``auto`` (pinned memory and a copy stream on CUDA; on a CPU device the host
    is the device), ``on`` (ask for them: on a CPU device this is said once, not ignored),
    ``off`` (copies on the compute stream, each waited for: the no-overlap baseline)."""
    global _told_host_is_device
    blocks = decoder_blocks(model)
    _place_outside_blocks(model, blocks, device)
    if device.type != "cuda":
        if streams == "on" and not _told_host_is_device:
            _told_host_is_device = True
            warnings.warn(
                f"train.offload_streams=on: the device is {device}, so the host is the device: "
                "blocks are copied into their slots without pinned memory or a copy stream",
                UserWarning,
                stacklevel=2,
            )
        return Offloaded(blocks, HostCopies(device), prefetch)
    for block in blocks:
        for param in block.parameters():
            param.data = param.data.to("cpu")
            if streams != "off":
                param.data = param.data.pin_memory()  # pinned: copies run async
    if streams == "off":
        return Offloaded(blocks, HostCopies(device), prefetch)
    return Offloaded(blocks, StreamCopies(device, min(prefetch + 1, len(blocks))), prefetch)


def _place_outside_blocks(
    model: nn.Module, blocks: Sequence[nn.Module], device: torch.device
) -> None:
    """Move to ``device`` every parameter of ``model`` outside ``blocks`` and every buffer
    (the blocks' too: small, and read by the blocks' calls), as ``model.to`` would: the
    parameter objects stay (``.data`` changes), and a tensor shared by several modules stays
    shared. The blocks' parameters are not touched."""
    home = {id(param) for block in blocks for param in block.parameters()}
    params = {id(p): p for p in model.parameters() if id(p) not in home}  # tied: once
    for param in params.values():
        param.data = param.data.to(device)
    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (kept alive, moved)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                if id(buffer) not in moved:
                    moved[id(buffer)] = (buffer, buffer.to(device))
                module._buffers[name] = moved[id(buffer)][1]


# ---------------------------------------------------------------------- run checks
class OffloadError(ConfigError):
    """A ``train.parallel=offload`` run that cannot be offloaded (exit 2 from the CLI)."""


def check_offloaded_run(config, world_size: int, offloadable: Sequence[str]) -> None:
    """Refuse what offloaded ZO does not do, before any model loads (never a fallback).

    ``offloadable``: the estimators registered as such (a trait): those whose forwards are
    plain or engine-substituted, so streamed weights change nothing but where they live."""
    if config.train.parallel != "offload":
        return
    fix = "or set train.parallel=data"
    if world_size > 1:
        raise OffloadError(
            f"train.parallel=offload runs in one process, and {world_size} were launched: run "
            "it without torchrun, or use train.parallel=fsdp to spread the model over them"
        )
    name = config.estimator.get("name")
    if name not in offloadable:
        raise OffloadError(
            f"estimator {name!r} cannot run offloaded (train.parallel=offload supports "
            f"{list(offloadable)}: gradients and jvp tangents do not cross the "
            f"per-block copies): {fix}"
        )
    if config.model.quant != "none":
        raise OffloadError(f"model.quant={config.model.quant} cannot run offloaded: {fix}")
    if config.engine.generator == "torch-chunks-v1":
        raise OffloadError(
            "engine.generator=torch-chunks-v1 (engine version 1) perturbs in hooks that offload "
            "cannot hand its copies to: use philox, philox-ieee or torch-blocks with train.parallel=offload"
        )
