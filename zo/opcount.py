"""Count the operators a piece of code dispatches, and the ones that make a GPU wait.

On a GPU every compute operator is (at least) one kernel launch, and a few operators make
the host wait for the device: their result decides a shape or a Python value. Counting
dispatched operators on any device (a CPU included) shows both without a GPU:
``zo bench ops`` compares a ZO step with two forwards this way, and the tests fail a step
that would wait for the device.

Compute operators exclude what launches nothing: views (``view``, ``slice``, ``t``...),
``detach``/``alias``, allocations (``empty*``) and the profiler's markers (``torch.optim``
wraps every ``step`` in one). Registered ``zo.*`` operators count once
each (on CUDA each is one kernel).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NOT_COMPUTE = frozenset(
    {
        "detach",
        "alias",
        "lift_fresh",
        "_unsafe_view",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "record_stream",
    }
)
"""Operators that launch no kernel (besides those whose schema marks them a view)."""

SYNC_OPERATORS = frozenset(
    {
        "_local_scalar_dense",  # .item(), float(t), bool(t)
        "nonzero",
        "nonzero_numpy",
        "argwhere",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "equal",
        "is_nonzero",
        "bincount",
    }
)
"""Operators whose output size or value the host must wait for."""


@dataclass
class OpCount:
    compute: collections.Counter = field(default_factory=collections.Counter)
    other: collections.Counter = field(default_factory=collections.Counter)
    syncs: list[tuple[int, str]] = field(default_factory=list)
    """(position among compute operators, name) of every operator that waits for the device."""
    order: list[str] = field(default_factory=list)
    """Every compute operator's name, in dispatch order."""

    @property
    def total(self) -> int:
        return sum(self.compute.values())

    def top(self, count: int = 12) -> dict[str, int]:
        return dict(self.compute.most_common(count))


def _is_sync(func, args, kwargs, name: str) -> bool:
    if name in SYNC_OPERATORS:
        return True
    if name == "repeat_interleave":
        return (kwargs or {}).get("output_size") is None
    if name == "index":  # boolean-mask indexing computes nonzero inside
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])
    if name in ("_to_copy", "copy_"):  # device -> host copies wait for the device
        source = args[1] if name == "copy_" else args[0]
        target_device = (
            args[0].device if name == "copy_" else (kwargs or {}).get("device", source.device)
        )
        return (
            isinstance(source, torch.Tensor)
            and source.device.type != "cpu"
            and torch.device(target_device).type == "cpu"
        )
    return False


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as counter: ...`` then ``counter.result``."""

    def __init__(self) -> None:
        super().__init__()
        self.result = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        namespace = func.namespace
        label = name if namespace == "aten" else f"{namespace}.{name}"
        if func.is_view or name in NOT_COMPUTE or namespace == "profiler":
            self.result.other[label] += 1
        else:
            if _is_sync(func, args, kwargs, name):
                self.result.syncs.append((self.result.total, label))
            self.result.compute[label] += 1
            self.result.order.append(label)
        return func(*args, **(kwargs or {}))
