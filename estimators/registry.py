"""Estimators by name, on :mod:`zo.registry`'s form (as model families and tasks).

Each estimator module ends with one call per estimator::

    register_estimator("zo_sgd", ZOSGDConfig, ZOSGD, zeroth_order=True, replayable=True,
                       seeded=True, memory=EstimatorMemory())

pairing the name with its config dataclass, its class (which implements
:class:`estimators.base.Estimator`) and its traits (:class:`EstimatorTraits`): everything the
loop, replay, data parallelism and the memory planner need to know per name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from estimators.base import Estimator
from zo.engine import EngineConfig
from zo.memory import EstimatorMemory, PlannedEstimator
from zo.registry import Registration, Registry


@dataclass(frozen=True)
class EstimatorTraits:
    """What other modules need to know about an estimator, declared on its registration."""

    zeroth_order: bool
    """Estimates from forward passes only: never calls backward(), so the loss needs no
    derivative (forward-mode AD aside: see ``eager_attention``)."""
    replayable: bool
    """Its steps replay from records: ``last_record`` after each step, ``apply_record`` and
    ``skip_step`` work, and a run writes a trajectory (``zo replay``)."""
    seeded: bool
    """Draws directions from the run's seed through the perturbation engine: the constructor
    takes ``seed=`` and ``engine=`` (build_estimator passes them only then)."""
    memory: EstimatorMemory
    """What a step keeps in memory (``zo plan`` and the memory preflight read it)."""
    needs_model: bool = False
    """The constructor takes ``model=`` (to find blocks, patch layers); the loop passes it."""
    eager_attention: bool = False
    """Needs eager attention (torch.func.jvp fails through SDPA kernels)."""
    grad_accum: bool = True
    """Supports several estimate() calls per step (LOMO updates inside backward: no)."""
    shardable: bool = False
    """Runs under ``train.parallel=fsdp`` on each rank's rows (tested bit-identical to data
    parallelism for ZO, within float summation order for first-order)."""
    offloadable: bool = False
    """Runs under ``train.parallel=offload``: its forwards are plain or engine-substituted (no
    autograd, no jvp tangents through the streamed copies)."""


@dataclass(frozen=True)
class EstimatorSpec(Registration[Any, "type[Estimator]", EstimatorTraits]):
    """An estimator's registration: ``config_class``, ``impl`` (the class) and ``traits``."""

    def planned(self) -> PlannedEstimator:
        """The estimator as the memory planner takes it."""
        return PlannedEstimator(self.name, self.traits.memory, self.traits.eager_attention)

    @property
    def needs_differentiable_loss(self) -> bool:
        """Backward (first-order) or forward-mode AD (jvp) needs a loss with a derivative;
        ZO estimators take any scalar, e.g. minus the F1 of decoded answers."""
        return not self.traits.zeroth_order or self.traits.eager_attention


class UnknownEstimatorError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


_ESTIMATORS: Registry[Any, type[Estimator], EstimatorTraits] = Registry(
    "estimator", EstimatorTraits, UnknownEstimatorError, registration_class=EstimatorSpec
)
ESTIMATORS: Mapping[str, EstimatorSpec] = _ESTIMATORS.as_mapping()  # type: ignore[assignment]
"""Read-only ``name -> registration`` view of the registered estimators."""


def register_estimator(
    name: str, config_class: type, impl: type[Estimator], **traits: Any
) -> type[Estimator]:
    """Add an estimator (traits: :class:`EstimatorTraits`). ``config_class`` is the dataclass
    of its settings, the one its constructor builds from (``impl.config_class``)."""
    if not dataclasses.is_dataclass(config_class) or not isinstance(config_class, type):
        raise TypeError(f"estimator {name!r}: config_class must be a dataclass of its settings")
    if impl.config_class is not config_class:  # type: ignore[attr-defined]
        raise TypeError(
            f"estimator {name!r}: {impl.__name__} builds from "
            f"{impl.config_class.__name__}, not {config_class.__name__}"  # type: ignore[attr-defined]
        )
    return _ESTIMATORS.register(name, config_class, impl, **traits)


def get_estimator(name: str) -> EstimatorSpec:
    return _ESTIMATORS.get(name)  # type: ignore[return-value]


def available_estimators() -> list[str]:
    return _ESTIMATORS.names()


def estimators_with(trait: str) -> list[str]:
    """The registered estimators whose ``trait`` is true, e.g. ``estimators_with("shardable")``."""
    return [name for name in available_estimators() if getattr(get_estimator(name).traits, trait)]


def build_estimator(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]],
    config: Any = None,
    model: torch.nn.Module | None = None,
    *,
    seed: int = 0,
    engine: EngineConfig | None = None,
    **settings: Any,
) -> Estimator:
    """Build the named estimator over ``params`` from its config dataclass (or defaults),
    with keyword ``settings`` overriding its fields.

    ``params`` may be named (``model.named_parameters()`` style), as torch.optim accepts;
    estimators that split the set by name (hybrid, block-wise) need the names. ``seed`` and
    ``engine`` reach ``seeded`` estimators only, ``model`` those that ``needs_model``.
    """
    spec = get_estimator(name)
    extra: dict[str, Any] = {}
    if spec.traits.seeded:
        extra.update(seed=seed, engine=engine)
    if spec.traits.needs_model:
        if model is None:
            raise ValueError(f"estimator {name!r} needs the model: build_estimator(..., model=)")
        extra["model"] = model
    return spec.impl(params, config, **extra, **settings)
