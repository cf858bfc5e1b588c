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
from typing import Any

import torch

from estimators.base import Closure, NonFiniteLossError, ZOEstimate, check_hyperparameters
from estimators.registry import register_estimator
from estimators.scaling import ScaleConfig
from estimators.zo_sgd import ZOSGD
from zo.engine import EngineConfig
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


@register_estimator(
    "forward_grad",
    ForwardGradConfig,
    zeroth_order=True,
    eager_attention=True,
    memory=EstimatorMemory(tangents=True, forward_passes=3),
)
class ForwardGrad(ZOSGD):
    """ZO-SGD whose scalars are exact directional derivatives from forward-mode AD.

    The closure must return the loss as a tensor computed from the model (a float has no
    tangent). Param groups may set their own ``lr`` and ``weight_decay``; every group moves
    along its own part of the same direction ``v`` (there is no per-group ``eps``).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        queries: int = 1,
        seed: int = 0,
        engine: EngineConfig | None = None,
        eps: float | None = None,
        scale: str = "absolute",
        scale_floor: float = 1e-3,
    ):
        if eps is not None:
            check_hyperparameters(eps=eps)  # ignored, but a bad value is still refused
            warnings.warn(
                f"forward_grad ignores eps={eps}: its directional derivatives are exact "
                "(forward-mode AD), there is no perturbation to scale; drop estimator.eps",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            queries=queries,
            seed=seed,
            engine=engine,
            scale=scale,
            scale_floor=scale_floor,
        )

    _fused_step = False  # its estimate reads each directional derivative

    def direction_scale(self, group_index: int) -> float:
        return 1.0  # tangents are the raw directions in every group

    @torch.no_grad()
    def estimate(self, closure: Closure) -> ZOEstimate:  # type: ignore[override]
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
        estimate = ZOEstimate(self.step_count, seeds, scalars, sum(losses) / len(losses))
        self._pending.append(estimate)
        return estimate
