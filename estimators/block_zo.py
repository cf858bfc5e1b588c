"""Block-wise ZO: each step perturbs and updates one block of the network, not all of it.

A *unit* is the trainable part of one decoder block (found by structure with
:func:`zo.blocks.decoder_blocks`, never by family-specific names), in forward order, plus
one last unit "outside blocks" for trainable tensors that no single block owns (embeddings,
final norm, head, a tensor tied across blocks). Units without a trainable tensor are left
out. Step ``t`` picks one unit by ``order`` (:data:`ORDERS`; a pure function of the run
seed and ``t``), then runs ZO-SGD restricted to it: the direction is zero outside the unit,
so the scalar estimates ``<grad_unit, z_unit>`` and only the unit's tensors move.

Param groups may carry their own ``lr``, ``eps`` and ``weight_decay`` (one group per block
gives per-block settings). A unit spanning groups measures along ``u_g = (eps_g/eps_r) z_g``
with ``r`` the unit's first group, and moves along that same ``u`` (as ZO-SGD does across
groups). Weight decay applies to the chosen unit only, once per visit.

Activation reuse (``reuse_activations``). The blocks before the chosen block ``k`` see no
perturbed tensor, so every forward of a step computes the same input for block ``k``. The
first forward of an estimate runs in full and keeps block ``k-1``'s output (one
hidden-state tensor per model call); later forwards of the same estimate skip blocks
``0..k-1`` -- their ``forward`` temporarily returns that kept output -- so the model loop
hands block ``k`` the very tensor it had before. Two-point: ``+eps`` runs in full, ``-eps``
(and further queries) from block ``k`` on; one-point: ``L(W)`` in full, each ``+eps`` from
``k`` on. Losses are bit-identical to running every block. This assumes what holds for
every decoder-only and encoder stack: blocks run in sequence, each taking the previous
one's output, and the loss reads no hidden state before block ``k`` except through it.
Block 0 and the outside unit run every forward in full.

Replay: the record's ``extra`` holds the unit's position and name and each group's eps,
so :meth:`BlockZO.apply_record` needs neither data nor the order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from estimators.base import Closure, StepRecord, ZOOptimizer, _Measured
from estimators.registry import register_estimator
from estimators.zo_sgd import ZOSGDConfig
from zo.blocks import NoBlocksError, decoder_blocks
from zo.engine import mix_seed
from zo.memory import EstimatorMemory

OUTSIDE = "outside blocks"
"""Name of the unit holding the trainable tensors that no single block owns."""

_BLOCK_STREAM = 0x424C4F434B  # "BLOCK": block choices draw from their own seed stream


def _cycle(step: int, count: int, run_seed: int) -> int:
    return step % count


def _random(step: int, count: int, run_seed: int) -> int:
    return mix_seed(_BLOCK_STREAM, run_seed, step) % count


def _shuffle(step: int, count: int, run_seed: int) -> int:
    generator = torch.Generator().manual_seed(mix_seed(_BLOCK_STREAM, run_seed, step // count))
    return int(torch.randperm(count, generator=generator)[step % count])


ORDERS: dict[str, Callable[[int, int, int], int]] = {
    "cycle": _cycle,
    "random": _random,
    "shuffle": _shuffle,
}
"""Unit chosen at a step: ``order(step, unit_count, run_seed) -> unit position``.
``cycle`` walks the units in forward order; ``random`` draws one independently per step;
``shuffle`` visits every unit once per round, in a fresh random order each round."""


@dataclass
class BlockZOConfig(ZOSGDConfig):
    """ZO-SGD's options, applied to the chosen block only (weight decay once per visit),
    plus which block each step perturbs."""

    order: str = "cycle"
    """Which block each step perturbs: ``cycle``, ``random`` or ``shuffle``."""
    reuse_activations: bool = True
    """Skip the blocks before the chosen one on all but the first forward of an estimate."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_order(self.order)


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"block_zo order {order!r} is unknown; choose one of {sorted(ORDERS)}")


@dataclass(frozen=True)
class Unit:
    """The trainable tensors of one block (or of none: ``block is None``)."""

    name: str
    block: int | None
    """Position in ``decoder_blocks(model)``; None for the outside unit."""
    groups: dict[int, list[int]]
    """Param-group index -> engine indices of this unit's tensors in that group."""

    @property
    def reference_group(self) -> int:
        return min(self.groups)


def find_blocks(model: nn.Module) -> list[nn.Module]:
    try:
        return decoder_blocks(model)
    except NoBlocksError as error:
        raise NoBlocksError(f"block_zo: {error}; use zo_sgd for such a model") from None


def partition_units(
    model: nn.Module,
    blocks: list[nn.Module],
    tensors: list[torch.Tensor],
    group_indices: list[list[int]],
) -> list[Unit]:
    """Units in forward order, the outside unit last; units without tensors are dropped.

    A tensor belongs to block ``b`` when every module holding it lies inside block ``b``.
    """
    names = {id(module): name for name, module in model.named_modules()}
    inside = [{id(m) for m in block.modules()} for block in blocks]
    owners: dict[int, list[int]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(id(module))
    group_of = {index: g for g, indices in enumerate(group_indices) for index in indices}
    members: dict[int | None, dict[int, list[int]]] = {}
    for index, tensor in enumerate(tensors):
        held_by = owners.get(id(tensor), [])
        block = next(
            (b for b, ids in enumerate(inside) if held_by and all(o in ids for o in held_by)),
            None,
        )
        members.setdefault(block, {}).setdefault(group_of[index], []).append(index)
    units = [
        Unit(names.get(id(blocks[b]), f"block {b}"), b, members[b])
        for b in range(len(blocks))
        if b in members
    ]
    if None in members:
        units.append(Unit(OUTSIDE, None, members[None]))
    return units


# ---------------------------------------------------------------------------- reuse
class PrefixReplayError(RuntimeError):
    """A forward of the same estimate called the blocks a different number of times."""


def _copy(value: Any) -> Any:
    """Tensors copied (a consumer may write into them); tuples and lists rebuilt around them."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_copy(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    return value


class PrefixReplay:
    """Run ``blocks[:stop]`` for real on the first pass, then hand back their kept output.

    Inside :meth:`installed`, every block before ``stop`` has its ``forward`` replaced. On
    the capture pass it runs as usual and the last one keeps a copy of its output per
    call; once :meth:`pass_done` has seen a pass that called them, the ``i``-th call of each
    prefix block returns a copy of the ``i``-th kept output without running anything, so
    the block at ``stop`` gets exactly the input it got on the capture pass.
    """

    def __init__(self, blocks: list[nn.Module], stop: int):
        self.blocks = blocks[:stop]
        self.outputs: list[Any] = []
        self.replaying = False
        self.calls = [0] * len(self.blocks)

    @contextlib.contextmanager
    def installed(self) -> Iterator[PrefixReplay]:
        saved = [block.__dict__.get("forward") for block in self.blocks]
        try:
            for position, block in enumerate(self.blocks):
                block.forward = self._wrapped(position, block.forward)
            yield self
        finally:
            for block, forward in zip(self.blocks, saved, strict=True):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def _wrapped(self, position: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        last = position == len(self.blocks) - 1

        def run(*args: Any, **kwargs: Any) -> Any:
            if self.replaying:
                call = self.calls[position]
                self.calls[position] += 1
                if call >= len(self.outputs):
                    raise self._mismatch()
                return _copy(self.outputs[call])
            output = forward(*args, **kwargs)
            if last:
                self.outputs.append(_copy(output))
            return output

        return run

    def pass_done(self) -> None:
        """End of one closure call: switch to replay after a capture, or check the replay."""
        if self.replaying and any(calls != len(self.outputs) for calls in self.calls):
            raise self._mismatch()
        self.replaying = bool(self.outputs)
        self.calls = [0] * len(self.blocks)

    def _mismatch(self) -> PrefixReplayError:
        return PrefixReplayError(
            f"the closure ran the model's blocks {len(self.outputs)} time(s) on its first call "
            "and a different number of times on a later call of the same estimate; block_zo "
            "reuses the first call's activations, so the closure must run the same forwards "
            "each time (or set reuse_activations=False)"
        )


# ---------------------------------------------------------------------------- estimator
class BlockZO(ZOOptimizer):
    """ZO-SGD on one block per step; the blocks before it are computed once per estimate.

    ``model`` is the network the closure runs (to find its blocks); ``params`` its
    trainable tensors, plain, named, or as param groups with their own lr/eps/weight_decay.
    """

    config_class = BlockZOConfig

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        config: BlockZOConfig | None = None,
        *,
        model: nn.Module,
        **settings: Any,
    ):
        self.blocks = find_blocks(model)
        super().__init__(params, config, **settings)
        self.order = self.config.order
        self.reuse_activations = self.config.reuse_activations
        self.units = partition_units(model, self.blocks, self.engine.tensors, self._group_indices)
        self._unit: Unit | None = None  # the unit being estimated, read by _scales
        self._prefix: PrefixReplay | None = None  # its activation reuse, told of each forward

    # ------------------------------------------------------------------ choice
    def unit_position(self, step: int) -> int:
        """Position in :attr:`units` of the unit that step ``step`` perturbs."""
        return ORDERS[self.order](step, len(self.units), self.run_seed)

    def unit_at(self, step: int) -> Unit:
        return self.units[self.unit_position(step)]

    # ------------------------------------------------------------------ estimates
    def _scales(self, sign: float) -> list[float]:
        if self._unit is None:
            raise RuntimeError("block_zo evaluates perturbed losses only inside estimate()")
        scales = [0.0] * len(self.engine.tensors)
        for group_index, indices in self._unit.groups.items():
            for index in indices:
                scales[index] = sign * self.param_groups[group_index]["eps"]
        return self._relative(scales)

    def _reference_eps(self) -> float:
        return self.param_groups[self._unit.reference_group]["eps"]  # type: ignore[union-attr]

    def _measure(self, closure: Closure) -> _Measured:
        """The base loop over the step's unit, with the blocks before it run once."""
        self._unit = unit = self.unit_at(self.step_count)
        stop = unit.block if self.reuse_activations and unit.block is not None else 0
        try:
            with PrefixReplay(self.blocks, stop).installed() as self._prefix:
                return super()._measure(closure)
        finally:
            self._unit, self._prefix = None, None

    def _loss(self, closure: Closure, seed: int | None, sign: float) -> torch.Tensor | float:
        value = super()._loss(closure, seed, sign)
        self._prefix.pass_done()  # type: ignore[union-attr]
        return value

    # ------------------------------------------------------------------ updates
    def _record_extra(self, record: StepRecord) -> dict[str, Any]:
        position = self.unit_position(record.step)
        return {
            "block": position,
            "block_name": self.units[position].name,
            "eps": [group["eps"] for group in self.param_groups],
        }

    def _recorded_unit(self, record: StepRecord) -> Unit:
        position = record.extra.get("block", self.unit_position(record.step))
        if not 0 <= position < len(self.units):
            raise ValueError(
                f"record for step {record.step} names block {position}, this model has "
                f"{len(self.units)} trainable units; was it written for another model?"
            )
        unit = self.units[position]
        name = record.extra.get("block_name", unit.name)
        if name != unit.name:
            raise ValueError(
                f"record for step {record.step} updates {name!r}, but unit {position} here is "
                f"{unit.name!r}: the trainable set differs from the run's"
            )
        return unit

    @torch.no_grad()
    def apply_record(self, record: StepRecord) -> None:
        """Update the recorded unit only: ``W_g <- decay W_g - lr_g (eps_g/eps_r) mean_q g_q z_q``."""
        if not self._opens(record):
            return
        unit = self._recorded_unit(record)
        eps = record.extra.get("eps") or [group["eps"] for group in self.param_groups]
        reference = eps[unit.reference_group]
        for group_index, indices in unit.groups.items():
            lr = record.lrs[group_index]
            decay = 1.0 - lr * record.weight_decays[group_index]
            factor = -lr * (eps[group_index] / reference) / len(record.scalars)
            self._update(record.seeds, [factor * s for s in record.scalars], decay, indices)
        self.step_count += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["block_zo"] = {"order": self.order, "units": [unit.name for unit in self.units]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("block_zo")
        mine = {"order": self.order, "units": [unit.name for unit in self.units]}
        if saved != mine:
            raise ValueError(
                f"optimizer state was saved by block_zo with order {saved['order']!r} over "
                f"{len(saved['units'])} units, this one has order {self.order!r} over "
                f"{len(self.units)}; keep the order and the trainable set when resuming"
            )
        super().load_state_dict(state_dict)


register_estimator(
    "block_zo",
    BlockZOConfig,
    BlockZO,
    zeroth_order=True,
    replayable=True,
    seeded=True,
    needs_model=True,
    memory=EstimatorMemory(kept_hidden_states=2, forward_passes=1.5),
)
