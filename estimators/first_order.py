"""Plain first-order baselines, ``sgd`` and ``adamw``, in the estimators' API.

``estimate(closure)`` runs forward and backward (gradients accumulate in ``.grad``);
``step()`` divides them by the number of estimates since the last step, so k micro-batches
give the gradient of their mean loss (the concatenated batch's, for equal sizes), applies
``torch.optim.SGD`` / ``torch.optim.AdamW`` and frees the gradients. These are subclasses
of the torch optimizers: param groups, per-parameter state and ``state_dict`` are theirs
(Adam's epsilon is the group key ``"eps"``, as in torch; the config calls it ``adam_eps``
because ``eps`` means the finite-difference scale everywhere else in this project).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from estimators.base import Closure, Estimate, GradientEstimator
from estimators.registry import register_estimator
from estimators.settings import configured
from zo.memory import EstimatorMemory
from zo.sharded_optim import is_sharded

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """A torch optimizer's own ``step`` without the hook runner torch wraps around it.

    torch wraps each optimizer class's ``step`` (once, marking it ``hooked``) to run the
    step hooks; our ``step`` is wrapped the same way, so calling the wrapped parent would
    run every hook twice per step.
    """
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class FirstOrderMixin(GradientEstimator):
    """The estimate/step split over a torch optimizer's gradient step (``_base``), built from
    the config dataclass (``config_class``) whose fields :meth:`_base_settings` translates."""

    config_class: ClassVar[type]
    _base: type[torch.optim.Optimizer]
    param_groups: list[dict[str, Any]]

    def __init__(self, params: Params, config: Any = None, **settings: Any):
        config = configured(self.config_class, config, settings, type(self).__name__)
        self._base.__init__(self, params, **self._base_settings(config))  # type: ignore[arg-type]
        self.step_count = 0
        self._pending_losses: list[float] = []

    @staticmethod
    def _base_settings(config: Any) -> dict[str, Any]:
        """The torch optimizer's keyword arguments."""
        return dataclasses.asdict(config)

    def estimate(self, closure: Closure) -> Estimate:
        """Forward and backward on the closure's batch; no weight changes."""
        if not self._pending_losses:  # gradients from outside the loop must not leak in
            self.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        loss, value = self._differentiable_loss(closure)
        loss.backward()
        self._pending_losses.append(value)
        return self._estimate(value)

    def step(self, closure: Closure | None = None) -> float:
        """``step(closure)`` = ``estimate(closure)`` then apply; returns the mean loss."""
        if closure is not None:
            self.estimate(closure)
        if not self._pending_losses:
            raise RuntimeError("step() without a closure needs at least one estimate() first")
        count = len(self._pending_losses)
        loss = sum(self._pending_losses) / count
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if self.reducer is not None and not is_sharded(p.grad):
                        self.reducer.mean_(p.grad)  # FSDP2 reduce-scattered a sharded one
                    if count > 1:
                        p.grad.div_(count)
        _unhooked(self._base.step)(self)
        self.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        self._pending_losses.clear()
        self.step_count += 1
        return self._mean_loss(loss)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # type: ignore[misc]
        state["first_order"] = {"step_count": self.step_count}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads our own state dicts and plain torch ones (step_count then starts at 0)."""
        state_dict = dict(state_dict)
        ours = state_dict.pop("first_order", {"step_count": 0})
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self.step_count = ours["step_count"]
        self._pending_losses.clear()


@dataclass
class SGDConfig:
    lr: float = 1e-3
    """Step size on the (averaged) gradient."""
    momentum: float = 0.0
    """Heavy-ball momentum (``torch.optim.SGD``'s)."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = 0.0
    """L2 decay added to the gradient, as ``torch.optim.SGD`` does."""


class SGD(FirstOrderMixin, torch.optim.SGD):
    """``torch.optim.SGD``: the config's fields are its keyword arguments."""

    config_class = SGDConfig
    _base = torch.optim.SGD


@dataclass
class AdamWConfig:
    lr: float = 1e-5
    """Step size (a common full fine-tuning lr for models of a few hundred million
    parameters)."""
    beta1: float = 0.9
    """Decay of the first-moment average."""
    beta2: float = 0.999
    """Decay of the second-moment average."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon (torch's ``eps``; ``eps`` here is the ZO perturbation)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (torch's default is 0.01; 0 matches the other estimators)."""


class AdamW(FirstOrderMixin, torch.optim.AdamW):
    config_class = AdamWConfig
    _base = torch.optim.AdamW

    @staticmethod
    def _base_settings(config: AdamWConfig) -> dict[str, Any]:  # type: ignore[override]
        return {
            "lr": config.lr,
            "betas": (config.beta1, config.beta2),
            "eps": config.adam_eps,
            "weight_decay": config.weight_decay,
        }


_GRADIENTS = dict(zeroth_order=False, replayable=False, seeded=False)
register_estimator(
    "sgd",
    SGDConfig,
    SGD,
    **_GRADIENTS,
    shardable=True,
    memory=EstimatorMemory(gradients="all", forward_passes=3),
)
register_estimator(
    "adamw",
    AdamWConfig,
    AdamW,
    **_GRADIENTS,
    shardable=True,
    memory=EstimatorMemory(gradients="all", state_copies=2, foreach_temp=True, forward_passes=3),
)
