"""What every zeroth-order estimator shares: seeds, the estimate/step split, replay records.

A ZO gradient is a handful of ``(seed, scalar)`` pairs: the direction ``z`` is regenerated
from the seed by the engine, the scalar is the projected gradient ``<grad, z>`` estimated
from forward passes. Gradient accumulation averages the scalars of one seed over
micro-batches; data parallelism all-reduces them; a run's trajectory lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from estimators.scaling import tensor_scales
from zo.engine import EngineConfig, build_engine, mix_seed

Closure = Callable[[], "torch.Tensor | float"]


@dataclass
class ZOEstimate:
    """One estimate on one micro-batch: no weight has changed yet."""

    step: int
    seeds: list[int]
    scalars: list[float]
    """Projected-gradient estimate ``<grad, z_q>`` per query."""
    loss: float


@dataclass
class StepRecord:
    """Everything an update needs, so that ``apply_record`` replays it bit for bit."""

    step: int
    seeds: list[int]
    scalars: list[float]
    lrs: list[float]
    """Learning rate of each param group at this step."""
    weight_decays: list[float]
    loss: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        return cls(**data)


class NonFiniteLossError(FloatingPointError):
    pass


class ClosureError(RuntimeError):
    """A closure that a zeroth-order estimator cannot use (it calls backward())."""


def call_closure(closure: Closure) -> torch.Tensor | float:
    """``closure()``, with the error of a closure that calls ``backward()`` made clear (ZO
    estimators run it under ``torch.no_grad()``, where torch's own error names no cause)."""
    try:
        return closure()
    except RuntimeError as error:
        if torch.is_grad_enabled() or "does not require grad" not in str(error):
            raise
        raise ClosureError(
            "the closure called backward() (or autograd.grad): a zeroth-order estimator "
            "needs no gradients and runs the closure under torch.no_grad(). Return the loss "
            "without calling loss.backward() or optimizer.zero_grad() "
            "(loss = opt.step(lambda: model(**batch).loss)); for gradients use a first-order "
            "estimator (sgd, adamw, lomo)"
        ) from error


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


def mean_over_ranks(value: float, reduce: Callable[[torch.Tensor], None]) -> float:
    """``value`` averaged over data-parallel ranks by an in-place tensor ``reduce`` hook."""
    tensor = torch.tensor([value], dtype=torch.float64)
    reduce(tensor)
    return float(tensor)


def _as_float(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def differentiable_loss(
    closure: Callable[[], torch.Tensor], step: int
) -> tuple[torch.Tensor, float]:
    """Run a first-order estimator's closure with grad enabled: the loss and its value.

    Raises when the loss is non-finite or has no graph back to a trainable tensor.
    """
    with torch.enable_grad():
        loss = closure()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the closure returned a non-finite loss ({value}) at step {step}; "
            "lower lr or check the batch"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the closure's loss does not require grad: no trainable tensor reached it "
            "(are the parameters frozen, or did the closure run under torch.no_grad()?)"
        )
    return loss, value


@dataclass
class _Measured:
    """An estimate's scalars and losses as device fp64 tensors, not yet read."""

    step: int
    seeds: list[int]
    scalars: torch.Tensor
    losses: torch.Tensor

    def read(self) -> ZOEstimate:
        """Read once (one device-to-host copy); a non-finite value raises."""
        values = torch.cat([self.scalars, self.losses]).tolist()
        scalars, losses = values[: len(self.seeds)], values[len(self.seeds) :]
        if not all(math.isfinite(v) for v in values):
            bad = next(v for v in losses + scalars if not math.isfinite(v))
            raise NonFiniteLossError(
                f"the closure returned a non-finite loss or estimate ({bad}) at step "
                f"{self.step}; lower eps or lr, or check the batch"
            )
        return ZOEstimate(self.step, self.seeds, scalars, sum(losses) / len(losses))


def _as_fp64(values: list[torch.Tensor | float]) -> torch.Tensor:
    """Losses stacked in fp64 where the closure left them (a float closure: on the CPU)."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([v.reshape(()) for v in values]).to(torch.float64)  # type: ignore[union-attr]
    return torch.tensor([_as_float(v) for v in values], dtype=torch.float64)


def _scalar_like(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d device tensor: dividing by it is exact IEEE division (a CUDA
    kernel given a host scalar divisor multiplies by its reciprocal instead)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


_IDENTITY: dict[tuple[int, torch.device], torch.Tensor] = {}


def _identity_coefficients(queries: int, device: torch.device) -> torch.Tensor:
    """``[1, 0, .., 0]``: the update that leaves the weights as they are."""
    key = (queries, device)
    if key not in _IDENTITY:
        values = [1.0] + [0.0] * queries
        _IDENTITY[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return _IDENTITY[key]


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: two-point (or one-point) seed-replay estimates over param groups.

    Subclasses decide how the averaged scalars become an update by overriding
    :meth:`_group_coefficients` (and may keep state, e.g. momentum).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        queries: int = 1,
        one_point: bool = False,
        seed: int = 0,
        engine: EngineConfig | None = None,
        scale: str = "absolute",
        scale_floor: float = 1e-3,
    ):
        check_hyperparameters(
            lr=lr, eps=eps, weight_decay=weight_decay, queries=queries, scale_floor=scale_floor
        )
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.queries = queries
        self.one_point = one_point
        self.run_seed = seed
        tensors = [p for group in self.param_groups for p in group["params"]]
        self.engine = build_engine(tensors, engine)
        self.tensor_scales = tensor_scales(tensors, scale, scale_floor)
        """``estimator.scale=relative``: each tensor's fixed scale (estimators/scaling.py)."""
        self._group_indices: list[list[int]] = []
        start = 0
        for group in self.param_groups:
            self._group_indices.append(list(range(start, start + len(group["params"]))))
            start += len(group["params"])
        self.step_count = 0
        self._pending: list[ZOEstimate] = []
        self.last_record: StepRecord | None = None
        self.reduce_scalars: Callable[[list[float], float], tuple[list[float], float]] | None = None
        """Data-parallel hook: maps (local scalars, local loss) to global means."""

    # ------------------------------------------------------------------ estimates
    def seeds_for(self, step: int) -> list[int]:
        return [mix_seed(self.run_seed, step, query) for query in range(self.queries)]

    def _scales(self, sign: float) -> list[float]:
        scales = [
            sign * group["eps"]
            for group, indices in zip(self.param_groups, self._group_indices, strict=True)
            for _ in indices
        ]
        return self._relative(scales)

    def _relative(self, scales: list[float]) -> list[float]:
        """Per-tensor perturbation scales in each tensor's own units (``scale=relative``)."""
        if self.tensor_scales is None:
            return scales
        return [value * s for value, s in zip(scales, self.tensor_scales, strict=True)]

    def _update(self, seeds, coefficients: Sequence[float], decay: float, indices) -> None:
        """``engine.update`` of tensors ``indices``; under ``scale=relative`` tensor ``i``'s
        coefficients are multiplied by its scale (one pass per tensor)."""
        if self.tensor_scales is None:
            self.engine.update(seeds, coefficients, decay, indices)
            return
        for index in indices:
            scale = self.tensor_scales[index]
            self.engine.update(seeds, [c * scale for c in coefficients], decay, [index])

    def _evaluate(self, closure: Closure, seed: int | None, sign: float) -> float:
        loss = _as_float(self._loss(closure, seed, sign))
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"the closure returned a non-finite loss ({loss}) at step {self.step_count}; "
                "lower eps or lr, or check the batch"
            )
        return loss

    def _loss(self, closure: Closure, seed: int | None, sign: float) -> torch.Tensor | float:
        """The closure's loss with W perturbed by ``sign * eps * z(seed)`` (None: plain W),
        left where the closure computed it: reading it would wait for the device."""
        if seed is None:
            value = call_closure(closure)
        else:
            with self.engine.perturbed(seed, self._scales(sign)):
                value = call_closure(closure)
        return value.detach() if isinstance(value, torch.Tensor) else float(value)

    def _measure(self, closure: Closure) -> _Measured:
        """Run the estimate's forwards; scalars and losses stay device tensors (fp64, with
        Python's float arithmetic, so a read gives what host arithmetic would)."""
        seeds = self.seeds_for(self.step_count)
        eps = self.param_groups[0]["eps"]  # groups scale z by their own eps ratio below
        if self.one_point:
            base = self._loss(closure, None, 0.0)
            values = [self._loss(closure, seed, 1.0) for seed in seeds]
            stacked = _as_fp64([base, *values])
            base, values = stacked[:1], stacked[1:]
            scalars = (values - base) / _scalar_like(eps, values)
            losses = base
        else:
            values = []
            for seed in seeds:
                values += [self._loss(closure, seed, 1.0), self._loss(closure, seed, -1.0)]
            pairs = _as_fp64(values).view(-1, 2)
            plus, minus = pairs[:, 0], pairs[:, 1]
            scalars = (plus - minus) / _scalar_like(2 * eps, plus)
            losses = (plus + minus) / _scalar_like(2.0, plus)
        return _Measured(self.step_count, seeds, scalars, losses)

    @torch.no_grad()
    def estimate(self, closure: Closure) -> ZOEstimate:
        """Estimate the projected gradients on the closure's batch; weights do not change.

        Call it once per micro-batch, then :meth:`step` once: every micro-batch of a step
        uses the same seeds, and ``step`` averages their scalars.
        """
        estimate = self._measure(closure).read()
        self._pending.append(estimate)
        return estimate

    def _combine_pending(self) -> tuple[list[float], float]:
        if not self._pending:
            raise RuntimeError("step() without a closure needs at least one estimate() first")
        n = len(self._pending)
        scalars = [sum(e.scalars[q] for e in self._pending) / n for q in range(self.queries)]
        loss = sum(e.loss for e in self._pending) / n
        if self.reduce_scalars is not None:
            scalars, loss = self.reduce_scalars(scalars, loss)
        return scalars, loss

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """``step(closure)`` = ``estimate(closure)`` then apply; ``step()`` applies the pending ones."""
        fused = self._fused_step and not self._pending and self.reduce_scalars is None
        if closure is not None and fused:
            return self._step_without_sync(closure)
        if closure is not None:
            self.estimate(closure)
        scalars, loss = self._combine_pending()
        record = StepRecord(
            step=self.step_count,
            seeds=self._pending[0].seeds,
            scalars=scalars,
            lrs=[group["lr"] for group in self.param_groups],
            weight_decays=[group["weight_decay"] for group in self.param_groups],
            loss=loss,
        )
        record.extra = self._record_extra(record)
        self._pending.clear()
        self.apply_record(record)
        self.last_record = record
        return loss

    _fused_step = False
    """Whether ``step(closure)`` may update before reading its scalars: the update must be
    :meth:`_linear_factor` times the scalars, with nothing else decided from them."""

    def _step_without_sync(self, closure: Closure) -> float:
        """Estimate and update with the scalars on the device; read them once, after.

        A non-finite loss or scalar zeroes the update on the device (decay 1, coefficients
        0: the weights are left bit for bit) and raises once read, as :meth:`estimate` does.
        The coefficients are the ones :meth:`apply_record` computes from the recorded
        scalars, so replay is bit-exact.
        """
        measured = self._measure(closure)
        lrs = [group["lr"] for group in self.param_groups]
        weight_decays = [group["weight_decay"] for group in self.param_groups]
        scalars = measured.scalars
        finite = torch.isfinite(torch.cat([scalars, measured.losses])).all()
        keep = None
        for group_index, indices in enumerate(self._group_indices):
            factor = self._linear_factor(lrs, group_index, len(measured.seeds))
            decay = 1.0 - lrs[group_index] * weight_decays[group_index]
            if factor == 0.0 and decay == 1.0:
                continue  # lr = 0: nothing to write, so the weights stay bit-identical
            if keep is None:
                keep = _identity_coefficients(len(measured.seeds), scalars.device)
            coefficients = torch.cat([_scalar_like(decay, scalars).view(1), scalars * factor])
            if self.tensor_scales is None:
                coefficients = torch.where(finite, coefficients, keep).to(torch.float32)
                self.engine.update_device(measured.seeds, coefficients, indices)
                continue
            for index in indices:  # the same fp64 products as _update's, rounded once
                ones = torch.ones_like(coefficients)
                ones[1:] = self.tensor_scales[index]
                scaled = torch.where(finite, coefficients * ones, keep).to(torch.float32)
                self.engine.update_device(measured.seeds, scaled, [index])
        estimate = measured.read()  # the step's one read of device values
        record = StepRecord(
            step=self.step_count,
            seeds=measured.seeds,
            scalars=estimate.scalars,
            lrs=lrs,
            weight_decays=weight_decays,
            loss=estimate.loss,
        )
        self.last_record = record
        self.step_count += 1
        return estimate.loss

    def _linear_factor(self, lrs: Sequence[float], group_index: int, queries: int) -> float:
        """For linear estimators: query ``q``'s coefficient in group ``group_index``'s
        update is this factor times scalar ``q``."""
        raise NotImplementedError

    def skip_step(self, reason: str) -> StepRecord:
        """Spend this step without an update (the loop's ``train.on_nonfinite=skip``).

        The pending estimates are dropped; weights and optimizer state stay as they are. The
        record (``extra["skipped"]``, no scalars) replays as the same no-op, so a trajectory
        with skipped steps still rebuilds the weights bit for bit.
        """
        record = StepRecord(
            step=self.step_count,
            seeds=self.seeds_for(self.step_count),
            scalars=[],
            lrs=[group["lr"] for group in self.param_groups],
            weight_decays=[group["weight_decay"] for group in self.param_groups],
            loss=math.nan,
            extra={"skipped": reason},
        )
        self._pending.clear()
        self.apply_record(record)
        self.last_record = record
        return record

    def _skipped(self, record: StepRecord) -> bool:
        """True, with the step spent, when ``record`` is a skipped step (:meth:`skip_step`)."""
        if "skipped" not in record.extra:
            return False
        if record.step != self.step_count:
            raise ValueError(f"record for step {record.step} applied at step {self.step_count}")
        self.step_count += 1
        return True

    @torch.no_grad()
    def apply_record(self, record: StepRecord) -> None:
        """Apply one recorded update; training and replay both go through here."""
        if self._skipped(record):
            return
        if record.step != self.step_count:
            raise ValueError(f"record for step {record.step} applied at step {self.step_count}")
        for group_index, indices in enumerate(self._group_indices):
            lr = record.lrs[group_index]
            decay = 1.0 - lr * record.weight_decays[group_index]
            coefficients = self._group_coefficients(record, group_index)
            self._update(record.seeds, coefficients, decay, indices)
        self.step_count += 1

    def _record_extra(self, record: StepRecord) -> dict[str, Any]:
        """What else ``apply_record`` needs (choices, hyperparameters), decided before it runs.

        Called by :meth:`step` while the micro-batch estimates are still pending.
        """
        return {}

    def _group_coefficients(self, record: StepRecord, group_index: int) -> Sequence[float]:
        """Coefficient of each query's direction in the update of one param group."""
        raise NotImplementedError

    def direction_scale(self, group_index: int) -> float:
        """How much longer group ``group_index``'s part of the direction is than group 0's.

        With per-group eps the finite difference measures ``<grad, u>`` along
        ``u = (eps_g / eps_0) z``, so the update must move along that same ``u``.
        """
        return self.param_groups[group_index]["eps"] / self.param_groups[0]["eps"]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zo"] = {"step_count": self.step_count, "run_seed": self.run_seed}
        if self.tensor_scales is not None:
            state["zo"]["tensor_scales"] = list(self.tensor_scales)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo_state = state_dict.pop("zo")
        if zo_state["run_seed"] != self.run_seed:
            raise ValueError(
                f"optimizer state was saved with seed {zo_state['run_seed']}, this one has "
                f"{self.run_seed}; directions would not match"
            )
        saved_scales = zo_state.get("tensor_scales")
        if (saved_scales is None) != (self.tensor_scales is None):
            raise ValueError(
                "optimizer state was saved with another estimator.scale; keep it when resuming"
            )
        if saved_scales is not None:
            if len(saved_scales) != len(self.tensor_scales):
                raise ValueError("optimizer state holds scales for another trainable set")
            self.tensor_scales = [float(s) for s in saved_scales]  # the run's record
        super().load_state_dict(state_dict)
        self.step_count = zo_state["step_count"]
        self._pending.clear()
