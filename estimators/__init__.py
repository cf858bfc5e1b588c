"""Gradient estimators, each a ``torch.optim.Optimizer``, registered by name.

Every module in this package registers its estimators on import; they are all imported
here, so ``estimators.available_estimators()`` lists them without further wiring.
"""

import importlib
import pkgutil

from estimators.base import (
    ClosureError,
    NonFiniteLossError,
    StepRecord,
    ZOEstimate,
    ZOOptimizer,
    check_hyperparameters,
)
from estimators.registry import (
    ESTIMATORS,
    EstimatorSpec,
    UnknownEstimatorError,
    available_estimators,
    build_estimator,
    get_estimator,
)
from estimators.zo_sgd import ZOSGD, ZOSGDConfig

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ESTIMATORS",
    "ClosureError",
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
    "check_hyperparameters",
    "get_estimator",
]
