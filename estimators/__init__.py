"""Gradient estimators, each a ``torch.optim.Optimizer``, registered by name."""

from estimators.base import NonFiniteLossError, StepRecord, ZOEstimate, ZOOptimizer
from estimators.registry import (
    ESTIMATORS,
    EstimatorSpec,
    UnknownEstimatorError,
    available_estimators,
    build_estimator,
    get_estimator,
)
from estimators.zo_sgd import ZOSGD, ZOSGDConfig

__all__ = [
    "ESTIMATORS",
    "EstimatorSpec",
    "NonFiniteLossError",
    "StepRecord",
    "UnknownEstimatorError",
    "ZOEstimate",
    "ZOOptimizer",
    "ZOSGD",
    "ZOSGDConfig",
    "available_estimators",
    "build_estimator",
    "get_estimator",
]
