"""Flat host buffers that a perturbed forward draws its buckets into, reused bucket by bucket.

A perturbed forward materialises its trainable tensors a bucket (up to 2**22 elements on a
CPU) at a time. Allocated afresh, every bucket of every forward is a new block from the C
allocator; above glibc's mmap threshold (``zo.memory.return_large_frees_to_os`` fixes it at
1 MiB) that is a new mapping which the kernel page-faults and zeroes, then unmaps: measured
at ~540,000 minor faults and ~0.7 s of system time per OPT-125m ZO-SGD step. The pool keeps
a few buffers and hands them out again. The engine clears it when a perturbed forward ends
(:meth:`zo.buckets.PerturbedForward.close`): kept between forwards, a buffer would stay
resident through whatever the step does next (measured: +19 MiB on ``hybrid``'s peak, its
first-order backward), for one allocation per forward saved.

Reuse is safe by construction: a buffer is handed out only when nothing but the pool
references its storage (the storage's use count is what it was when the pool allocated it).
Every view of a bucket -- a module's swapped-in parameter, a parent module's that is still
running while its children draw the next bucket, a prefetched bucket not yet taken, a tensor
an autograd graph saved, a view a caller kept -- holds the storage, so a buffer is never
rewritten while any of them lives; the pool then allocates another. A Python
``UntypedStorage`` object of a buffer is the pool's own (torch keeps one per storage) and
is not counted: hand out tensors, never a bucket's storage object.

Only host memory that is not page-locked is pooled. CUDA's caching allocator already reuses
device memory without asking the OS, and orders reuse across streams (``record_stream``),
which a pool of its own would have to redo with events; pinned host memory has torch's
caching host allocator for the same reasons.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

POOLING = hasattr(torch._C, "_storage_Use_Count")
"""Whether this torch can count a storage's users (a private function, also used by torch's
own CUDA graph trees). Without it no buffer can be proven idle: :class:`BufferPool` then
allocates every bucket afresh, as the engine did before the pool, and says so once."""


def storage_users(tensor: torch.Tensor) -> int:
    """References to ``tensor``'s storage: every tensor viewing it, plus the storage's
    Python object while one exists (``torch._C._storage_Use_Count``, as torch's own CUDA
    graph trees use it to tell whether an output is still referenced)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


@dataclass(eq=False)  # identity: list.remove must not compare the buffers
class _Kept:
    buffer: torch.Tensor
    idle_users: int
    """:func:`storage_users` with only the pool holding the buffer."""

    def idle(self) -> bool:
        return storage_users(self.buffer) == self.idle_users


class BufferPool:
    """At most ``slots`` buffers per (device, dtype), each handed out only while idle.

    ``slots`` bounds what the pool keeps, not what it hands out: when every kept buffer is
    in use and the pool is full, :meth:`take` returns a fresh tensor that is not kept (freed
    with its last view, as if there were no pool). A buffer the pool keeps has at least the
    size :meth:`reserve` announced (the largest bucket), so that requests of every size fit
    every buffer and a buffer is not regrown request by request. ``allocations`` counts the
    buffers it allocated, kept or not.
    """

    def __init__(self, slots: int):
        if slots < 0:
            raise ValueError(f"a buffer pool needs slots >= 0, got {slots}")
        self.slots = slots
        self.kept: dict[tuple[torch.device, torch.dtype], list[_Kept]] = {}
        self.reserved: dict[tuple[torch.device, torch.dtype], int] = {}
        self.allocations = 0

    def reserve(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        """Buffers kept from now on for ``(device, dtype)`` hold at least ``numel`` elements."""
        key = (torch.device(device), dtype)
        self.reserved[key] = max(numel, self.reserved.get(key, 0))

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``numel`` elements of a flat buffer nobody else references (contents undefined)."""
        device = torch.device(device)
        if device.type != "cpu":  # the device's caching allocator pools (see the module doc)
            return self._allocate(numel, dtype, device)
        if not POOLING:
            _say_once(
                "zo: bucket buffers are not pooled: this torch has no "
                "torch._C._storage_Use_Count to tell an idle buffer, so every bucket of a "
                "perturbed forward is allocated afresh (same values, more page faults)"
            )
            return self._allocate(numel, dtype, device)
        kept = self.kept.setdefault((device, dtype), [])
        idle = [entry for entry in kept if entry.idle()]
        fitting = [entry for entry in idle if entry.buffer.numel() >= numel]
        if fitting:
            return min(fitting, key=lambda entry: entry.buffer.numel()).buffer[:numel]
        if idle:  # all idle ones are too small: the largest makes way for a larger one
            kept.remove(max(idle, key=lambda entry: entry.buffer.numel()))
        elif len(kept) >= self.slots:
            return self._allocate(numel, dtype, device)  # full and busy: not kept
        buffer = self._allocate(max(numel, self.reserved.get((device, dtype), 0)), dtype, device)
        kept.append(_Kept(buffer, storage_users(buffer)))
        return buffer[:numel]

    def _allocate(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.allocations += 1
        return torch.empty(numel, dtype=dtype, device=device)

    def kept_bytes(self) -> int:
        """Bytes the pool holds (resident between forwards once touched)."""
        return sum(
            entry.buffer.numel() * entry.buffer.element_size()
            for entries in self.kept.values()
            for entry in entries
        )

    def clear(self) -> None:
        """Forget every kept buffer (views handed out stay valid: they hold their storage)."""
        self.kept = {}


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr)
