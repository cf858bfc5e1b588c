"""ZO-SGD (MeZO): ``W <- W - lr * mean_q(g_q * z_q)``, g_q the projected gradient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from estimators.base import StepRecord, ZOConfig, ZOOptimizer
from estimators.registry import register_estimator
from zo.memory import EstimatorMemory


@dataclass
class ZOSGDConfig(ZOConfig):
    lr: float = 1e-6
    """Step size on the projected gradient (MeZO's lr)."""


class ZOSGD(ZOOptimizer):
    config_class = ZOSGDConfig
    _fused_step = True

    def _linear_factor(self, lrs: Sequence[float], group_index: int, queries: int) -> float:
        return -lrs[group_index] * self.direction_scale(group_index) / queries

    def _group_coefficients(self, record: StepRecord, group_index: int) -> Sequence[float]:
        factor = self._linear_factor(record.lrs, group_index, len(record.scalars))
        return [factor * scalar for scalar in record.scalars]


register_estimator(
    "zo_sgd",
    ZOSGDConfig,
    ZOSGD,
    zeroth_order=True,
    replayable=True,
    seeded=True,
    shardable=True,
    offloadable=True,
    memory=EstimatorMemory(),
)
