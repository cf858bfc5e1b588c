"""Sharded training on FSDP2: each rank perturbs and updates its own shard.

Zeroth-order estimators run through :class:`ShardedEngine` (below); first-order ones
(sgd, adamw, lomo) through FSDP2's own gradient reduce-scatter, with what both need from an
optimizer over shards in :mod:`zo.sharded_optim` (gradient hooks, whole state in
``state_dict``). For zeroth order:

``fully_shard`` (``torch.distributed.fsdp``) cuts every parameter along dim 0 into one
contiguous row range per rank and all-gathers a unit's (decoder block's, or the root's)
parameters just before that unit's forward. ZO needs nothing else from it:

* Directions are addressed by global coordinates ``(step seed, tensor, element offset)``
  (:mod:`zo.directions`), so a rank draws exactly its rows' part of ``z``: the same values
  the unsharded run draws there, whatever the world size.
* A perturbed forward writes ``W + scale * z`` into each unit's local shard just before
  FSDP gathers it (a forward pre-hook ahead of FSDP's) and copies the saved shard back just
  after (a pre-hook behind FSDP's): the gathered weights are the perturbed ones, the stored
  shard ends bit-identical, and the extra memory is one unit's shard. The perturbed values
  come from the same pass, in the same arithmetic, as the unsharded engine's copies, so a
  sharded run's weights equal the unsharded run's bit for bit.
* The update is the unsharded update restricted to the rank's rows, and per-element state
  (momentum, ZO-Adam's moments) is kept for those rows only: the engine's tensors are the
  local shards at their global offsets (:meth:`PerturbationEngine.axpz_at`).

One path differs: the unsharded engine multiplies a block's linear layer of more than
``engine.offload_threshold`` elements by ``W + scale z`` a block of output features at a
time (:mod:`zo.output_side`), the sharded engine by its gathered perturbed weight. The
values are the same where BLAS sums a block of features as it sums the whole matrix (on CPU
for blocks of more than a few features, tested in the unsharded engine), not by contract.
Embeddings and the head go through the unsharded engine's own path.

Every rank measures the same losses (FSDP gathers the whole unit for each rank), so the
projected-gradient scalars are equal on all ranks without a reduction; the data-parallel
hook then averages the ranks' batch shards as in plain data parallelism.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from zo.config import ConfigError
from zo.engine import EngineConfig, PerturbationEngine
from zo.sharded_optim import UnitGradientHooks, shard_offset, sharded_state, whole_state
from zo.trainable import TrainableSet

__all__ = [
    "ShardedEngine",
    "allocate_gather_buffers",
    "shard_model",
    "shard_offset",
    "sharded_estimator",
]


def shard_model(blocks: Sequence[nn.Module], mesh=None) -> None:
    """``fully_shard`` each decoder block over ``mesh`` (default: all ranks).

    The rest (embeddings, final norm, head: ~1% of a 7B+ model) stays whole on every rank:
    scoring and generation call the backbone and the head separately, which a root unit's
    forward hooks would never see. Each block is its own FSDP root, resharded after every
    forward, so the next (differently perturbed) forward gathers again. Blocks on the meta
    device stay there (``to_empty`` then materialises only the shards). Each block's
    sharded parameters can take :func:`gradient_hook` s (fused first-order updates).

    The blocks share one communication context (``share_comm_ctx``, FSDP2's API for several
    roots): each context keeps its last reduce-scatter input -- a layer's unsharded
    gradients -- until its next reduce-scatter or the end of backward, so with a context per
    block a first-order backward held one layer's gradients *per block* (measured: +49 MB
    per layer on a 271 M shape), where one shared context holds one in all."""
    from torch.distributed.fsdp import fully_shard, share_comm_ctx

    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
        UnitGradientHooks(block)
    share_comm_ctx(list(blocks))


@torch.no_grad()
def allocate_gather_buffers(blocks: Sequence[nn.Module]) -> None:
    """Gather and free each block once, outside any inference_mode.

    FSDP allocates a unit's gather buffers on its first gather: inside ``inference_mode``
    (evaluation) they would be inference tensors that a later training forward may not
    write."""
    for block in blocks:
        block.unshard()
        block.reshard()


class ShardedEngine(PerturbationEngine):
    """:class:`PerturbationEngine`'s passes over the local shards of FSDP2 parameters.

    ``params`` are the trainable parameters in the estimator's order (the seed addresses
    use that order, as unsharded); ``units`` are the modules ``fully_shard`` was applied to.
    The engine's tensors are the local shards (flat) at their global offsets, so updates,
    per-element state and :meth:`draw` need nothing of their own here; only forwards do:
    a shard is written just before FSDP gathers it and restored just after. Parameters
    outside every unit (whole on each rank: embeddings, final norm, head) go through the
    unsharded engine's own perturbed forward (buckets, output-side embedding rows), exactly
    as in a one-process run.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        units: Sequence[nn.Module],
        config: EngineConfig | None = None,
    ):
        from torch.distributed.tensor import DTensor

        shards = [shard_offset(p) for p in params]
        # a whole tensor is itself (the engine's hooks find a module's parameters by identity)
        tensors = [
            s if isinstance(p, DTensor) else p for p, (s, _) in zip(params, shards, strict=True)
        ]
        super().__init__(tensors, config, offsets=[offset for _, offset in shards])
        self.params = list(params)
        by_param = {id(p): i for i, p in enumerate(params)}
        self.unit_members: list[tuple[nn.Module, list[int]]] = []
        for unit in units:
            inner = {id(q) for q in _nested_unit_params(unit, units)}
            own = [
                by_param[id(p)]
                for p in unit.parameters()
                if id(p) in by_param and id(p) not in inner
            ]
            self.unit_members.append((unit, own))
        claimed = [i for _, own in self.unit_members for i in own]
        if len(set(claimed)) != len(claimed):
            raise ValueError("a trainable parameter belongs to two fully_shard units")
        self.loose = set(range(len(params))) - set(claimed)

    # ------------------------------------------------------------------ forwards
    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float | Sequence[float]) -> Iterator[None]:
        scales = (
            [float(scale)] * len(self.tensors)
            if isinstance(scale, (int, float))
            else [float(s) for s in scale]
        )
        if len(scales) != len(self.tensors):
            raise ValueError("perturbed() needs one scale per tensor")
        ones = self.constant((1.0, 1.0), self.device)

        def write(index: int, saved: torch.Tensor, shard: torch.Tensor) -> None:
            if scales[index] != 0.0:
                self.axpz_at([saved], [shard], [index], [seed], ones, scales[index])

        whole = [scale if i in self.loose else 0.0 for i, scale in enumerate(scales)]
        with self._shards_written(write), super().perturbed(seed, whole):
            yield

    @contextlib.contextmanager
    def substituted(
        self, replacement: Callable[[int, torch.Tensor], torch.Tensor | None]
    ) -> Iterator[None]:
        """Forwards see ``replacement(i, shard_i)`` (a new flat shard) in place of each local
        shard, gathered by FSDP, and ``replacement(i, W_i)`` for whole tensors."""

        def write(index: int, saved: torch.Tensor, shard: torch.Tensor) -> None:
            new = replacement(index, saved)
            if new is not None:
                shard.copy_(new.reshape(-1))

        with self._shards_written(write), super().substituted(replacement):
            yield

    @contextlib.contextmanager
    def _shards_written(self, write) -> Iterator[None]:
        """While inside, ``write(i, saved_copy, shard)`` fills each unit's shards just before
        FSDP gathers them (a pre-hook ahead of FSDP's), and a pre-hook behind FSDP's puts the
        saved shards back: the gathered weights are the written ones, the stored shards end
        bit-identical, and the extra memory is one unit's shard."""
        saved: dict[int, list[tuple[int, torch.Tensor]]] = {}

        @torch.no_grad()
        def before_gather(unit: nn.Module, args) -> None:
            entries = saved[id(unit)] = [(i, self._flat(i).clone()) for i in self._members_of(unit)]
            for i, copy in entries:
                write(i, copy, self._flat(i))

        @torch.no_grad()
        def after_gather(unit: nn.Module, args) -> None:
            for i, copy in saved.pop(id(unit), []):
                self._flat(i).copy_(copy)

        handles = []
        for unit, _ in self.unit_members:
            handles.append(unit.register_forward_pre_hook(before_gather, prepend=True))
            handles.append(unit.register_forward_pre_hook(after_gather))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():  # a forward that raised between the two hooks
                for entries in saved.values():
                    for i, copy in entries:
                        self._flat(i).copy_(copy)

    def _flat(self, index: int) -> torch.Tensor:
        return self.tensors[index].detach().view(-1)

    def _members_of(self, unit: nn.Module) -> list[int]:
        for candidate, members in self.unit_members:
            if candidate is unit:
                return members
        return []


def _nested_unit_params(unit: nn.Module, units: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Parameters of the other units nested inside ``unit`` (FSDP manages them there)."""
    others = [u for u in units if u is not unit and _contains(unit, u)]
    return [p for other in others for p in other.parameters()]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


def sharded_estimator(optimizer, units: Sequence[nn.Module], zeroth_order: bool = True) -> None:
    """Make an estimator built over FSDP2 parameters work on shards.

    Zeroth-order: its engine perturbs and updates the local shards (:class:`ShardedEngine`),
    per-element state (momentum, Adam's moments) is kept for the shard only. First-order:
    FSDP2 reduce-scatters the gradients and torch.optim steps on the DTensor parameters
    (LOMO's fused update hooks the blocks through :func:`gradient_hook`). Either way
    ``state_dict()`` holds whole state tensors (gathered, a collective), as one process
    would save them, and ``load_state_dict`` takes whole ones and keeps this rank's part."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if zeroth_order:
        optimizer.engine = ShardedEngine(params, units, optimizer.engine.config)
    optimizer.register_state_dict_post_hook(functools.partial(whole_state, params))
    if not zeroth_order:  # torch.optim's state of a DTensor parameter is a DTensor
        optimizer.register_load_state_dict_pre_hook(functools.partial(sharded_state, params))


# ---------------------------------------------------------------------- the loop's side

SHARDABLE_TRAINABLES = ("full", "names", "mask", "lora")


class ShardingError(ConfigError):
    """A ``train.parallel=fsdp`` run that cannot be sharded (exit 2 from the CLI)."""


def check_sharded_run(config, world_size: int, shardable: Sequence[str]) -> None:
    """Refuse what sharded ZO does not do, before any model loads (never a fallback).

    ``shardable``: the estimators registered as such (a trait): the zeroth-order ones whose
    passes are perturbed forwards and per-element updates, and the first-order baselines
    (FSDP2 reduce-scatters their gradients). Not block_zo (it perturbs one block's whole
    tensors at a time), forward_grad (jvp through FSDP's gathers) or hybrid."""
    if config.train.parallel != "fsdp":
        return
    fix = "or set train.parallel=data"
    if world_size < 2:
        raise ShardingError(
            "train.parallel=fsdp shards the model over the launched processes, and this is one "
            "process: launch with `torchrun --nproc_per_node N -m zo.cli train ...` (N >= 2), "
            + fix
        )
    name = config.estimator.get("name")
    if name not in shardable:
        raise ShardingError(
            f"estimator {name!r} cannot run sharded yet (train.parallel=fsdp supports "
            f"{list(shardable)}): "
            f"use one of those, {fix}"
        )
    if config.trainable.kind not in SHARDABLE_TRAINABLES:
        raise ShardingError(
            f"trainable {config.trainable.kind!r} cannot run sharded yet (train.parallel=fsdp "
            f"supports {list(SHARDABLE_TRAINABLES)}): {fix}"
        )
    if config.model.quant != "none":
        raise ShardingError(f"model.quant={config.model.quant} cannot run sharded: {fix}")
    if config.engine.generator == "torch-chunks-v1":
        raise ShardingError(
            "engine.generator=torch-chunks-v1 cannot address a shard's elements; use "
            "philox, philox-ieee or torch-blocks with train.parallel=fsdp"
        )


def shard_for_training(
    model: nn.Module, device: torch.device, trainable: TrainableSet, checkpoint=None
) -> tuple[TrainableSet, list[nn.Module]]:
    """Shard ``model``'s decoder blocks over all ranks, after its trainable set was chosen
    (a mask's sparse-delta layers and LoRA's adapters shard with their blocks). A model on
    the meta device is then filled from ``checkpoint``
    (:class:`zo.sharded_loading.MetaCheckpoint`), each rank its own rows. Returns the
    trainable set over the sharded parameters (same names and order) and the FSDP units."""
    from torch.distributed.device_mesh import init_device_mesh

    from zo.blocks import decoder_blocks

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    blocks = decoder_blocks(model)
    shard_model(blocks, mesh)
    if checkpoint is not None:
        checkpoint.fill(model, device)
    allocate_gather_buffers(blocks)
    params = [model.get_parameter(name) for name in trainable.names]
    return TrainableSet(trainable.names, params), blocks


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole tensors from sharded ones, on the host (a collective: every rank calls it).

    Gathered one tensor at a time; a rank with ``keep=False`` (not the checkpoint's writer)
    drops each at once, so only the writer ever holds the whole model, and in host memory."""
    from torch.distributed.tensor import DTensor

    whole = {}
    for name, tensor in tensors.items():
        gathered = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if keep:
            whole[name] = gathered.detach().cpu()
    return whole


@torch.no_grad()
def load_full_tensors(names: Sequence[str], params: Sequence[torch.Tensor], tensors) -> None:
    """Copy whole checkpoint tensors into sharded parameters: each rank takes its rows."""
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint lacks trainable tensors {missing[:5]}")
    for name, param in zip(names, params, strict=True):
        whole = tensors[name]
        if tuple(whole.shape) != tuple(param.shape) or whole.dtype != param.dtype:
            raise ValueError(
                f"checkpoint tensor {name} is {tuple(whole.shape)} {whole.dtype}, the model has "
                f"{tuple(param.shape)} {param.dtype}"
            )
        local, offset = shard_offset(param)
        local.view(-1).copy_(whole.reshape(-1)[offset : offset + local.numel()])
