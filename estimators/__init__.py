"""Gradient estimators, each a ``torch.optim.Optimizer`` implementing the contract
:class:`estimators.base.Estimator`, registered by name.

Every module in this package registers its estimators on import; they are all imported
here, so ``estimators.available_estimators()`` lists them without further wiring.
"""

import importlib
import pkgutil

from estimators.base import (
    Closure,
    ClosureError,
    Estimate,
    Estimator,
    NonFiniteLossError,
    NotReplayableError,
    Reducer,
    StepRecord,
    ZOConfig,
    ZOEstimate,
    ZOOptimizer,
)
from estimators.registry import (
    ESTIMATORS,
    EstimatorSpec,
    EstimatorTraits,
    UnknownEstimatorError,
    available_estimators,
    build_estimator,
    estimators_with,
    get_estimator,
    register_estimator,
)
from estimators.settings import check_hyperparameters
from estimators.zo_sgd import ZOSGD, ZOSGDConfig

_INFRASTRUCTURE = {"base", "registry", "settings"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ESTIMATORS",
    "Closure",
    "ClosureError",
    "Estimate",
    "Estimator",
    "EstimatorSpec",
    "EstimatorTraits",
    "NonFiniteLossError",
    "NotReplayableError",
    "Reducer",
    "StepRecord",
    "UnknownEstimatorError",
    "ZOConfig",
    "ZOEstimate",
    "ZOOptimizer",
    "ZOSGD",
    "ZOSGDConfig",
    "available_estimators",
    "estimators_with",
    "build_estimator",
    "check_hyperparameters",
    "get_estimator",
    "register_estimator",
]
