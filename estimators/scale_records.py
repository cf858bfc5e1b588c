"""A run's per-tensor scales in its trajectory header: written at creation, checked on resume
and replay (kept apart from :mod:`estimators.scaling`, which the estimators import)."""

from __future__ import annotations

from estimators.base import Estimator, ZOOptimizer
from estimators.hybrid import Hybrid
from estimators.scaling import check_header_entry, header_entry


def optimizer_scales(optimizer: Estimator) -> list[float] | None:
    """The ZO part's per-tensor scales under ``estimator.scale=relative`` (else None)."""
    zeroth = optimizer.zeroth if isinstance(optimizer, Hybrid) else optimizer
    return zeroth.tensor_scales if isinstance(zeroth, ZOOptimizer) else None


def scales_header(optimizer: Estimator) -> dict:
    """The trajectory header's ``tensor_scales`` entry (empty under scale=absolute)."""
    entry = header_entry(optimizer_scales(optimizer))
    return {} if entry is None else {"tensor_scales": entry}


def check_recorded_scales(
    header: dict, trajectory: object, optimizer: Estimator, error: type[Exception]
) -> None:
    """The scales a relative-scale run recorded in its ``trajectory`` header are the ones
    these weights give (resume, replay); a damaged or mismatched record is refused, naming
    the file."""
    entry = header.get("tensor_scales")
    scales = optimizer_scales(optimizer)
    if entry is None and scales is None:
        return
    if entry is None:
        raise error(f"{trajectory}: the header records no tensor_scales for scale=relative")
    try:
        check_header_entry(entry, scales, f"{trajectory} header")
    except ValueError as problem:
        raise error(str(problem)) from None
