"""What FSDP2-sharded parameters need from optimizers, zeroth- or first-order alike.

* Where a rank's shard of a parameter sits in the whole tensor (:func:`shard_offset`): the
  global element offset its directions and state are addressed from.
* Gradient hooks for sharded parameters (:func:`gradient_hook`): autograd never accumulates
  into an FSDP2 shard; FSDP reduce-scatters a block's gradients (their mean over ranks)
  after the block's backward and assigns each shard's ``.grad``. A fused update (LOMO)
  runs right after that, block by block, in the same order on every rank.
* Whole optimizer state in ``state_dict`` (:func:`whole_state`), gathered one tensor at a
  time, and this rank's part taken back on load (:func:`sharded_state`): a sharded run's
  checkpoint is the one a single process writes, and resumes with any number of ranks.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch import nn


def shard_offset(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's local shard of ``param`` (a flat view that writes through) and the global
    element offset of its first element. A plain tensor is its own whole shard."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param.detach().view(-1), 0
    placements = tuple(param.placements)
    if len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"sharded ZO supports parameters sharded on dim 0 over one mesh dimension (FSDP2's "
            f"default); got placements {placements}"
        )
    local = param.to_local().detach()
    rows = param.shape[0]
    world = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    per_rank = -(-rows // world)  # torch.chunk's split, which FSDP2 uses
    first_row = min(rank * per_rank, rows)
    expected = max(0, min(per_rank, rows - first_row))
    if local.shape[0] != expected or not local.is_contiguous():
        raise ValueError(
            f"rank {rank}'s shard has {local.shape[0]} rows, torch.chunk would give {expected}: "
            "sharded ZO cannot address this layout"
        )
    row_numel = math.prod(param.shape[1:])  # not param[0]: a DTensor would gather its rows
    return local.view(-1), first_row * row_numel


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor: an FSDP2 parameter's shard, or a gradient FSDP2 reduce-scattered (already
    the mean over ranks)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gradient_hook(param: torch.Tensor, hook: Callable[[torch.Tensor], None]):
    """``param.register_post_accumulate_grad_hook(hook)``, also for FSDP2-sharded parameters.

    A sharded parameter's gradient is never accumulated by autograd: FSDP2 reduce-scatters
    its block's gradients after the block's backward and assigns each shard's ``.grad``.
    For those, ``hook(param)`` runs right after that reduce-scatter, block by block (the
    same order on every rank), which is what a fused update (LOMO) needs. Returns a handle
    with ``remove()``."""
    for unit in _UNITS:
        if id(param) in unit.ids:
            return unit.add(param, hook)
    return param.register_post_accumulate_grad_hook(hook)


class _AfterBackward(torch.autograd.Function):
    """Identity whose backward runs ``callback`` (after FSDP's post-backward: applied to a
    block's inputs before FSDP wraps them, so its backward comes after FSDP's)."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


class UnitGradientHooks:
    """The gradient hooks of one FSDP2 unit's sharded parameters (:func:`gradient_hook`)."""

    def __init__(self, unit: nn.Module):
        self.hooks: dict[int, tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = {}
        # by identity, which moving the model keeps (a weakref on a parameter would stop
        # torch from swapping a DTensor's data in place)
        self.ids = {id(p) for p in unit.parameters() if is_sharded(p)}
        _UNITS.add(self)
        # prepended after fully_shard: runs before FSDP's pre-forward wraps the inputs
        unit.register_forward_pre_hook(self._wrap_inputs, prepend=True, with_kwargs=True)

    def add(self, param: torch.Tensor, hook: Callable[[torch.Tensor], None]):
        key = max(self.hooks, default=-1) + 1
        self.hooks[key] = (param, hook)
        return _Handle(lambda: self.hooks.pop(key, None))

    def _wrap_inputs(self, unit: nn.Module, args: tuple, kwargs: dict):
        if not torch.is_grad_enabled():  # hooks are added for backward: wrap every forward
            return None
        args, kwargs = list(args), dict(kwargs)
        places = [(args, i) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        places += [(kwargs, k) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        graded = [(c, k) for c, k in places if c[k].requires_grad]
        if not graded:  # frozen layers below: the input carries the backward (one more grad)
            floating = [(c, k) for c, k in places if c[k].is_floating_point()]
            if not floating:
                raise RuntimeError(
                    "a fused gradient update on a sharded block needs a floating-point input "
                    f"tensor to the block ({type(unit).__name__}) to hook its backward"
                )
            container, key = floating[0]
            container[key] = container[key].detach().requires_grad_()
            graded = [floating[0]]
        outputs = _AfterBackward.apply(self._fire, *[c[k] for c, k in graded])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for (container, key), output in zip(graded, outputs, strict=True):
            container[key] = output
        return tuple(args), kwargs

    def _fire(self) -> None:
        for param, hook in list(self.hooks.values()):
            if param.grad is None:
                continue
            if param.grad.device.type == "cuda":  # FSDP reduce-scatters on its own stream
                torch.cuda.synchronize(param.grad.device)
            hook(param)


class _Handle:
    def __init__(self, remove: Callable[[], None]):
        self.remove = remove


_UNITS: weakref.WeakSet[UnitGradientHooks] = weakref.WeakSet()  # live as their modules


def whole_state(params: list[torch.Tensor], optimizer, state_dict: dict) -> dict:
    """Gather each per-element state tensor of a sharded parameter, one at a time; only the
    checkpoint's writer (rank 0) keeps them (the other ranks' dicts keep their shards)."""
    keep = torch.distributed.get_rank() == 0
    state = {}
    for index, entries in state_dict["state"].items():
        state[index] = dict(entries)
        for key, value in entries.items():
            whole = _gathered(params[index], value)
            if whole is not None and keep:
                state[index][key] = whole
    return {**state_dict, "state": state}


def _gathered(param: torch.Tensor, value) -> torch.Tensor | None:
    """The whole tensor of ``value`` (a DTensor, or the local shard of ``param``'s rows) on
    the host; None when ``value`` is not per-element state of a sharded parameter."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if not (is_sharded(param) and isinstance(value, torch.Tensor) and value.dim() > 0):
        return None
    local = param.to_local()
    if value.numel() != local.numel():
        return None
    shard = DTensor.from_local(
        value.reshape(local.shape),
        param.device_mesh,
        param.placements,
        shape=param.shape,
        stride=param.stride(),
    )
    return shard.full_tensor().cpu()


def sharded_state(params: list[torch.Tensor], optimizer, state_dict: dict) -> dict:
    """Whole state tensors of sharded parameters as DTensors of this rank's rows."""
    from torch.distributed.tensor import DTensor

    state = {}
    for index, entries in state_dict["state"].items():
        param = params[index]
        state[index] = dict(entries)
        for key, value in entries.items():
            if is_sharded(param) and isinstance(value, torch.Tensor) and value.shape == param.shape:
                local = param.to_local()
                part, offset = shard_offset(param)
                rows = value.reshape(-1)[offset : offset + part.numel()].view(local.shape)
                state[index][key] = DTensor.from_local(
                    rows.to(local.device, copy=True),
                    param.device_mesh,
                    param.placements,
                    shape=param.shape,
                    stride=param.stride(),
                )
    return {**state_dict, "state": state}
