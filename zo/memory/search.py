"""Which configurations fit a memory budget: ``zo plan --budget 8GiB``.

Every combination of the choices left open (quantization, trainable set, estimator,
activation checkpointing for the estimators that call backward) is planned at the largest
micro-batch, then sequence length, that fits: both start at what was asked (``zo train``'s
defaults) and halve. What the user fixed stays fixed. Each fitting configuration gets a
relative cost, and the list is ordered best first (:func:`rank`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from zo.memory.estimator import PlannedEstimator
from zo.memory.shapes import PlanError
from zo.memory.step import GIB, Plan, PlanRequest, parse_trainable, plan_memory

TRAINABLE_CHOICES = ("full", "lora", "mask:0.001")
"""The trainable sets searched when none is given: all weights, LoRA on ``zo train``'s
default targets, a 0.1% mask (the SensZOQ density)."""
QUANT_CHOICES = ("none", "nf4")
MIN_SEQ_LEN = 32
"""The search halves the sequence length down to this before giving a configuration up."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_budget(text: str) -> int:
    """Bytes of ``8GiB``, ``8G`` (binary), ``8GB`` (decimal), ``512MiB``, ``1.5TiB``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise PlanError(
            f"budget {text!r} is not a size: give a number with a unit, e.g. 8GiB, 24G, "
            "512MiB (GiB = 2**30 bytes, GB = 10**9)"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise PlanError(f"budget {text!r} must be more than zero")
    return int(value)


@dataclass(frozen=True)
class Fit:
    """A configuration that fits, with its plan and cost."""

    plan: Plan
    cost: float
    """Forward-pass equivalents per training token (see :func:`step_cost`)."""
    relative_cost: float = 1.0
    """``cost`` over the cheapest fitting configuration's."""

    @property
    def request(self) -> PlanRequest:
        return self.plan.request


def step_cost(request: PlanRequest) -> float:
    """Compute per training token, in forward passes of the model: the estimator's
    registered ``forward_passes``; a backward over frozen weights (LoRA, masks) skips the
    weight gradients (one pass less); activation checkpointing recomputes one forward. NF4's
    dequantization and the kernels' speed are not modelled (a relative count, not seconds)."""
    memory = request.estimator.memory
    passes = memory.forward_passes
    if memory.backward and not parse_trainable(request.trainable, request.lora_r).dense:
        passes -= 1
    if memory.backward and request.gradient_checkpointing:
        passes += 1
    return passes


@dataclass(frozen=True)
class SearchSpace:
    """What varies; a tuple of one value is a choice the user fixed."""

    estimators: Sequence[PlannedEstimator]
    trainables: Sequence[str] = TRAINABLE_CHOICES
    quants: Sequence[str] = QUANT_CHOICES
    checkpointing: Sequence[bool] = (False, True)


@dataclass(frozen=True)
class SearchResult:
    fits: list[Fit]
    """The configurations that fit, best first."""
    refused: dict[str, str]
    """Combinations the planner refuses, by description, with its reason (e.g. LoRA
    targets that name no layer of the model)."""


def search(base: PlanRequest, space: SearchSpace, budget: int) -> SearchResult:
    """Every fitting configuration, best first. ``base`` holds the fixed settings and the
    largest batch and sequence length to try."""
    fits: list[Fit] = []
    refused: dict[str, str] = {}
    for request in _combinations(base, space):
        try:
            fit = _largest_fit(request, budget)
        except PlanError as error:
            refused[describe(request)] = str(error)
            continue
        if fit is not None:
            fits.append(fit)
    return SearchResult(rank(fits), refused)


def describe(request: PlanRequest) -> str:
    """``zo_sgd, lora, nf4, checkpointing`` (the searched settings of a request)."""
    parts = [request.estimator.name, request.trainable, request.quant]
    if request.gradient_checkpointing:
        parts.append("checkpointing")
    return ", ".join(parts)


def smallest(base: PlanRequest, space: SearchSpace) -> Plan | None:
    """The configuration with the smallest peak at batch 1 and the shortest sequence (what
    the error names when nothing fits)."""
    floor = replace(base, batch=1, seq_len=min(base.seq_len, MIN_SEQ_LEN))
    plans = []
    for request in _combinations(floor, space):
        try:
            plans.append(plan_memory(request))
        except PlanError:
            continue  # listed in SearchResult.refused
    return min(plans, key=lambda p: p.process_total, default=None)


def rank(fits: Iterable[Fit]) -> list[Fit]:
    """Best first: the most of the model trained at full precision (full, then LoRA, then a
    mask; a dense base before a 4-bit one), then the cheapest per token, then the most
    tokens per step, then the smallest peak."""
    fits = list(fits)
    cheapest = min((f.cost for f in fits), default=1.0)
    fits = [replace(f, relative_cost=f.cost / cheapest) for f in fits]
    order = {"full": 0, "names": 0, "lora": 1, "mask": 2}

    def key(fit: Fit):
        request = fit.request
        kind = parse_trainable(request.trainable, request.lora_r).kind
        tokens = request.batch * request.seq_len
        quantized = request.quant != "none"
        return (order[kind], quantized, fit.cost, -tokens, fit.plan.process_total)

    return sorted(fits, key=key)


def _combinations(base: PlanRequest, space: SearchSpace) -> Iterable[PlanRequest]:
    for estimator in space.estimators:
        attention = "eager" if estimator.eager_attention else base.attention
        for trainable in space.trainables:
            for quant in space.quants:
                if quant == "nf4" and trainable == "full":
                    continue  # a 4-bit base is frozen
                for checkpointing in space.checkpointing:
                    if checkpointing and not estimator.memory.backward:
                        continue  # nothing is stored for backward
                    yield replace(
                        base,
                        estimator=estimator,
                        attention=attention,
                        trainable=trainable,
                        quant=quant,
                        gradient_checkpointing=checkpointing,
                    )


def _largest_fit(request: PlanRequest, budget: int) -> Fit | None:
    seq_len = request.seq_len
    while True:
        batch = request.batch
        while batch >= 1:
            plan = plan_memory(replace(request, batch=batch, seq_len=min(seq_len, request.seq_len)))
            if plan.process_total <= budget:
                return Fit(plan, step_cost(plan.request))
            batch //= 2
        if seq_len <= MIN_SEQ_LEN:
            return None
        seq_len = max(MIN_SEQ_LEN, seq_len // 2)


def gib(count: int) -> str:
    return f"{count / GIB:.2f} GiB"
