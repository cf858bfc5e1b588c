"""ZO-SGD (MeZO): ``W <- W - lr * mean_q(g_q * z_q)``, g_q the projected gradient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from estimators.base import StepRecord, ZOOptimizer
from estimators.registry import register_estimator
from estimators.scaling import ScaleConfig
from zo.memory import EstimatorMemory


@dataclass
class ZOSGDConfig(ScaleConfig):
    lr: float = 1e-6
    """Step size on the projected gradient (MeZO's lr)."""
    eps: float = 1e-3
    """Perturbation scale of the finite difference."""
    weight_decay: float = 0.0
    """Decoupled L2 decay, folded into the update pass: ``W *= 1 - lr * weight_decay``."""
    queries: int = 1
    """Directions per step; the update averages them (O(1) memory: seeds are replayed)."""
    one_point: bool = False
    """``(L(W + eps z) - L(W)) / eps`` instead of the symmetric two-point difference."""


@register_estimator("zo_sgd", ZOSGDConfig, zeroth_order=True, memory=EstimatorMemory())
class ZOSGD(ZOOptimizer):
    _fused_step = True

    def _linear_factor(self, lrs: Sequence[float], group_index: int, queries: int) -> float:
        return -lrs[group_index] * self.direction_scale(group_index) / queries

    def _group_coefficients(self, record: StepRecord, group_index: int) -> Sequence[float]:
        factor = self._linear_factor(record.lrs, group_index, len(record.scalars))
        return [factor * scalar for scalar in record.scalars]
