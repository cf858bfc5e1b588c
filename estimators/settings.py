"""Estimator settings: the range of every numeric one, and constructors built from configs.

Every estimator's settings are declared once, as the fields of its config dataclass. Its
constructor takes that config, keyword overrides of its fields, or both
(``ZOSGD(params, lr=1e-6, eps=1e-3)`` as torch.optim users write it), through
:func:`configured`, which also checks every numeric setting's range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

C = TypeVar("C")

_AT_LEAST_0 = (">= 0 and finite", lambda v: 0 <= v < math.inf)
_ABOVE_0 = ("> 0 and finite", lambda v: 0 < v < math.inf)
_UNIT = ("in [0, 1)", lambda v: 0 <= v < 1)
_COUNT = ("an integer >= 1", lambda v: float(v).is_integer() and v >= 1)

HYPERPARAMETER_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "lr": _AT_LEAST_0,
    "first_order_lr": _AT_LEAST_0,
    "eps": _ABOVE_0,
    "scale_floor": _ABOVE_0,
    "weight_decay": _AT_LEAST_0,
    "first_order_weight_decay": _AT_LEAST_0,
    "beta1": _UNIT,
    "beta2": _UNIT,
    "momentum": _UNIT,
    "adam_eps": _ABOVE_0,
    "clip_grad_norm": _ABOVE_0,
    "clip_grad_value": _ABOVE_0,
    "initial_loss_scale": _ABOVE_0,
    "min_loss_scale": _ABOVE_0,
    "queries": _COUNT,
    "loss_scale_window": _COUNT,
}
"""The range of every numeric estimator setting, by its name in the configs and the
constructors (NaN and infinity are in none of them). ``None`` stays allowed where a
setting is optional (the clip thresholds: off)."""


def check_hyperparameters(**values: Any) -> None:
    """Raise ValueError naming the first setting outside its range (unknown names pass)."""
    for name, value in values.items():
        if name not in HYPERPARAMETER_RANGES or value is None:
            continue
        rule, valid = HYPERPARAMETER_RANGES[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or math.isnan(value) or not valid(value):
            raise ValueError(f"{name} must be {rule}, got {value!r}")


def setting_names(config_class: type) -> list[str]:
    """The settings a config dataclass declares (its own and its bases'), in order."""
    return [f.name for f in dataclasses.fields(config_class) if f.init]


def configured(config_class: type[C], config: C | None, overrides: dict[str, Any], owner: str) -> C:
    """``config`` (defaults when None) with ``overrides`` applied, every range checked.

    An override that is not a field of ``config_class`` is a ``TypeError`` naming the valid
    ones, as for any constructor; so is a config of another class (``owner`` names the
    estimator in both messages).
    """
    if config is None:
        config = config_class()
    elif type(config) is not config_class:
        raise TypeError(
            f"{owner} takes a {config_class.__name__}, got a {type(config).__name__}; "
            f"build one with {config_class.__name__}(...) or pass its settings as keywords"
        )
    names = setting_names(config_class)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"{owner} got unknown setting(s) {unknown}; its settings are {names}")
    if overrides:
        config = dataclasses.replace(config, **overrides)  # type: ignore[type-var]
    check_hyperparameters(**{name: getattr(config, name) for name in names})
    return config


def narrowed(config: Any, config_class: type[C]) -> C:
    """The ``config_class`` part of ``config``, an instance of a subclass (hybrid's ZO-SGD)."""
    return config_class(**{name: getattr(config, name) for name in setting_names(config_class)})
