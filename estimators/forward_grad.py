"""Forward gradient: ZO-SGD's update with the projected gradient measured exactly.

Per query ``q`` the engine draws the direction ``v_q`` from the step's seed (the same
seeds and directions ZO-SGD would use) and one forward-mode AD pass gives the exact
directional derivative ``g . v_q = d/dt L(W + t v_q)`` (:mod:`zo.jvp`). The update is
ZO-SGD's, ``W <- (1 - lr wd) W - lr * mean_q (g . v_q) v_q``, an unbiased estimate of the
gradient step (``E[v v^T] = I``) with no finite-difference bias and no ``eps`` to tune.

Everything after the scalars is ZO-SGD's machinery: records are ``(seed, g . v)`` pairs, so
gradient accumulation, ``apply_record`` replay, ``state_dict`` resume and data-parallel
scalar all-reduce work unchanged; only :meth:`ForwardGrad.estimate` differs.

Costs per query: one forward with tangents (about 2-3x a plain forward in time, about 2x
its transient memory, no stored activations, no gradients). HF models must use eager
attention (registered with ``eager_attention``, so the loop loads them that way);
bitsandbytes 4-bit layers are run through a dequantizing forward that carries tangents.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from estimators.base import Closure, Estimate, NonFiniteLossError
from estimators.registry import register_estimator
from estimators.scaling import ScaleConfig
from estimators.zo_sgd import ZOSGD
from zo.jvp import directional_derivative
from zo.memory import EstimatorMemory


@dataclass
class ForwardGradConfig(ScaleConfig):
    lr: float = 1e-6
    """Step size on the projected gradient, as in ZO-SGD (the scalars have its scale)."""
    weight_decay: float = 0.0
    """Decoupled L2 decay, folded into the update pass: ``W *= 1 - lr * weight_decay``."""
    queries: int = 1
    """Tangent directions per step (one forward-AD pass each); the update averages them."""
    eps: float | None = None
    """Accepted so that one estimator section reads the same across methods, and ignored
    with a warning: the derivative is exact, there is no perturbation to scale."""
    one_point: ClassVar[bool] = False  # what the base loop reads: no finite difference here


class ForwardGrad(ZOSGD):
    """ZO-SGD whose scalars are exact directional derivatives from forward-mode AD.

    The closure must return the loss as a tensor computed from the model (a float has no
    tangent). Param groups may set their own ``lr`` and ``weight_decay``; every group moves
    along its own part of the same direction ``v`` (there is no per-group ``eps``).
    """

    config_class = ForwardGradConfig

    def __init__(self, params: Any, config: ForwardGradConfig | None = None, **settings: Any):
        super().__init__(params, config, **settings)
        if self.config.eps is not None:  # range-checked with the other settings
            warnings.warn(
                f"forward_grad ignores eps={self.config.eps}: its directional derivatives are "
                "exact (forward-mode AD), there is no perturbation to scale; drop estimator.eps",
                UserWarning,
                stacklevel=2,
            )

    def _group_defaults(self, config: ForwardGradConfig) -> dict[str, Any]:
        # eps is never read (direction_scale is 1); groups keep ZO-SGD's, as saved states hold
        return {"lr": config.lr, "eps": 1e-3, "weight_decay": config.weight_decay}

    _fused_step = False  # its estimate reads each directional derivative

    def direction_scale(self, group_index: int) -> float:
        return 1.0  # tangents are the raw directions in every group

    @torch.no_grad()
    def estimate(self, closure: Closure) -> Estimate:  # type: ignore[override]
        """Directional derivatives along the step's directions; weights do not change."""
        seeds = self.seeds_for(self.step_count)
        losses, scalars = [], []
        for seed in seeds:
            loss, derivative = directional_derivative(
                closure, self.engine, seed, self.tensor_scales
            )  # type: ignore[arg-type]
            if not (math.isfinite(loss) and math.isfinite(derivative)):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss}) or directional derivative ({derivative}) at step "
                    f"{self.step_count}; lower lr or check the batch"
                )
            losses.append(loss)
            scalars.append(derivative)
        estimate = Estimate(self.step_count, seeds, scalars, sum(losses) / len(losses))
        self._pending.append(estimate)
        return estimate


register_estimator(
    "forward_grad",
    ForwardGradConfig,
    ForwardGrad,
    zeroth_order=True,
    replayable=True,
    seeded=True,
    eager_attention=True,
    memory=EstimatorMemory(tangents=True, forward_passes=3),
)
