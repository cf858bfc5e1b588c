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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from estimators.base import check_hyperparameters, differentiable_loss, mean_over_ranks
from estimators.registry import register_estimator
from zo.engine import EngineConfig
from zo.memory import EstimatorMemory
from zo.sharded_optim import is_sharded

Closure = Callable[[], torch.Tensor]
Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """A torch optimizer's own ``step`` without the hook runner torch wraps around it.

    torch wraps each optimizer class's ``step`` (once, marking it ``hooked``) to run the
    step hooks; our ``step`` is wrapped the same way, so calling the wrapped parent would
    run every hook twice per step.
    """
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class FirstOrderMixin:
    """The estimate/step split over a torch optimizer's gradient step (``_base``)."""

    _base: type[torch.optim.Optimizer]
    param_groups: list[dict[str, Any]]

    def _init_first_order(self) -> None:
        self.step_count = 0
        self.last_record = None  # gradient steps are not seed-replayable
        self._pending_losses: list[float] = []
        self.reduce_gradient: Callable[[torch.Tensor], None] | None = None
        """Data-parallel hook: replaces a tensor (each gradient, then the loss) by its mean
        over ranks, in place."""

    def estimate(self, closure: Closure) -> float:
        """Forward and backward on the closure's batch; returns the loss. No weight changes."""
        if not self._pending_losses:  # gradients from outside the loop must not leak in
            self.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        loss, value = differentiable_loss(closure, self.step_count)
        loss.backward()
        self._pending_losses.append(value)
        return value

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
                    if self.reduce_gradient is not None and not is_sharded(p.grad):
                        self.reduce_gradient(p.grad)  # FSDP2 reduce-scattered a sharded one
                    if count > 1:
                        p.grad.div_(count)
        if self.reduce_gradient is not None:
            loss = mean_over_ranks(loss, self.reduce_gradient)
        _unhooked(self._base.step)(self)
        self.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        self._pending_losses.clear()
        self.step_count += 1
        return loss

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


@register_estimator(
    "sgd", SGDConfig, zeroth_order=False, memory=EstimatorMemory(gradients="all", forward_passes=3)
)
class SGD(FirstOrderMixin, torch.optim.SGD):
    _base = torch.optim.SGD

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        seed: int = 0,
        engine: EngineConfig | None = None,
    ):
        del seed, engine  # deterministic, and nothing is perturbed
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay)
        torch.optim.SGD.__init__(
            self, params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
        self._init_first_order()


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


@register_estimator(
    "adamw",
    AdamWConfig,
    zeroth_order=False,
    memory=EstimatorMemory(gradients="all", state_copies=2, foreach_temp=True, forward_passes=3),
)
class AdamW(FirstOrderMixin, torch.optim.AdamW):
    _base = torch.optim.AdamW

    def __init__(
        self,
        params: Params,
        lr: float = 1e-5,
        beta1: float = 0.9,
        beta2: float = 0.999,
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
        engine: EngineConfig | None = None,
    ):
        del seed, engine
        check_hyperparameters(
            lr=lr, beta1=beta1, beta2=beta2, adam_eps=adam_eps, weight_decay=weight_decay
        )
        torch.optim.AdamW.__init__(
            self,
            params,
            lr=lr,
            betas=(beta1, beta2),
            eps=adam_eps,
            weight_decay=weight_decay,
        )
        self._init_first_order()
