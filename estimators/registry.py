"""Estimators by name: each entry pairs an Optimizer class with its dataclass config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch

from zo.memory import EstimatorMemory, PlannedEstimator


@dataclass(frozen=True)
class EstimatorSpec:
    name: str
    optimizer_class: type[torch.optim.Optimizer]
    config_class: type
    zeroth_order: bool
    """True when the estimator never calls backward() and its trajectory replays."""
    needs_model: bool = False
    """The optimizer takes ``model=`` (to find blocks, patch layers); the loop passes it."""
    eager_attention: bool = False
    """Needs eager attention (torch.func.jvp fails through SDPA kernels)."""
    grad_accum: bool = True
    """Supports several estimate() calls per step (LOMO updates inside backward: no)."""
    memory: EstimatorMemory = EstimatorMemory()
    """What a step keeps in memory (``zo plan`` and the memory preflight read it)."""

    def planned(self) -> PlannedEstimator:
        """The estimator as the memory planner takes it."""
        return PlannedEstimator(self.name, self.memory, self.eager_attention)

    @property
    def needs_differentiable_loss(self) -> bool:
        """Backward (first-order) or forward-mode AD (jvp) needs a loss with a derivative;
        ZO estimators take any scalar, e.g. minus the F1 of decoded answers."""
        return not self.zeroth_order or self.eager_attention


ESTIMATORS: dict[str, EstimatorSpec] = {}


def register_estimator(
    name: str,
    config_class: type,
    zeroth_order: bool,
    *,
    needs_model: bool = False,
    eager_attention: bool = False,
    grad_accum: bool = True,
    memory: EstimatorMemory,
) -> Callable[[type[torch.optim.Optimizer]], type[torch.optim.Optimizer]]:
    def decorator(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is registered twice")
        ESTIMATORS[name] = EstimatorSpec(
            name, cls, config_class, zeroth_order, needs_model, eager_attention, grad_accum, memory
        )
        return cls

    return decorator


class UnknownEstimatorError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def get_estimator(name: str) -> EstimatorSpec:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise UnknownEstimatorError(
            f"unknown estimator {name!r}; choose one of {available_estimators()}"
        ) from None


def available_estimators() -> list[str]:
    return sorted(ESTIMATORS)


def build_estimator(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]],
    config: Any = None,
    model: torch.nn.Module | None = None,
    **extra,
) -> torch.optim.Optimizer:
    """Build the named estimator over ``params`` from its config dataclass (or defaults).

    ``params`` may be named (``model.named_parameters()`` style), as torch.optim accepts;
    estimators that split the set by name (hybrid, block-wise) need the names.
    ``model`` is passed on only to estimators registered with ``needs_model``.
    """
    spec = get_estimator(name)
    config = config if config is not None else spec.config_class()
    kwargs = {f.name: getattr(config, f.name) for f in fields(config)}
    kwargs.update(extra)
    if spec.needs_model:
        if model is None:
            raise ValueError(f"estimator {name!r} needs the model: build_estimator(..., model=)")
        kwargs["model"] = model
    return spec.optimizer_class(params, **kwargs)
