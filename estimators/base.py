"""The estimator contract, and the one two-point loop every zeroth-order estimator shares.

:class:`Estimator` is what the training loop, data parallelism, sharding, replay and the
transformers integration may call on an estimator; every registered estimator, first-order
ones included, implements it (``tests/test_estimator_contract.py`` checks each one). The
split form is ``estimate(closure)`` per micro-batch (no weight changes), then ``step()``;
``step(closure)`` does both. Every ``estimate`` returns an :class:`Estimate`.

A ZO gradient is a handful of ``(seed, scalar)`` pairs: the direction ``z`` is regenerated
from the seed by the engine, the scalar is the projected gradient ``<grad, z>`` estimated
from forward passes (:class:`ZOOptimizer`). Gradient accumulation averages the scalars of one
seed over micro-batches; data parallelism all-reduces them; a run's trajectory lists the
steps' :class:`StepRecord`, which ``apply_record`` replays bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, TypeAlias, runtime_checkable

import torch

from estimators.scaling import ScaleConfig, tensor_scales
from estimators.settings import configured
from zo.engine import EngineConfig, build_engine, mix_seed

Closure: TypeAlias = Callable[[], "torch.Tensor | float"]
"""What every estimator evaluates: the loss of one micro-batch at the current weights. It
never calls ``backward()``; first-order estimators call it under ``torch.enable_grad()``
and run backward themselves, zeroth-order ones under ``torch.no_grad()``."""


@dataclass
class Estimate:
    """One estimate on one micro-batch: no weight has changed yet.

    The one type every estimator's ``estimate`` returns. Zeroth-order estimators fill
    ``seeds`` and ``scalars`` (the whole gradient); first-order ones leave them empty (their
    gradient is in ``.grad``, or already applied by LOMO) and report the loss only.
    """

    step: int
    seeds: list[int]
    scalars: list[float]
    """Projected-gradient estimate ``<grad, z_q>`` per query."""
    loss: float


ZOEstimate = Estimate
"""The name :class:`Estimate` had while only zeroth-order estimators returned one."""


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


class Reducer(Protocol):
    """How data parallelism averages over ranks (``zo.distributed.DataParallel`` is one)."""

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over ranks of each value (a few floats: ZO scalars, losses)."""
        ...

    def mean_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` (a gradient) by its mean over ranks, in place."""
        ...


@runtime_checkable
class Estimator(Protocol):
    """The estimator contract: what the loop and everything around it may call.

    Registration traits (``estimators.registry``) say which optional parts hold: a
    ``replayable`` estimator's ``last_record`` is a :class:`StepRecord` after every step,
    and ``apply_record`` / ``skip_step`` work; on the others ``last_record`` stays None and
    those two raise :class:`NotReplayableError`.
    """

    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]
    """The settings a param group may override (torch.optim's)."""
    step_count: int
    """Steps taken (the seeds of a zeroth-order step derive from it)."""
    last_record: StepRecord | None
    """The last step's record (replayable estimators), None otherwise or before a step."""

    def estimate(self, closure: Closure) -> Estimate:
        """Estimate on one micro-batch; no weight changes until :meth:`step`."""
        ...

    def step(self, closure: Closure | None = None) -> float:
        """Apply what was estimated since the last step (``closure``: estimate it first);
        returns the step's mean loss."""
        ...

    def apply_record(self, record: StepRecord) -> None:
        """Replay one recorded step (training goes through here too)."""
        ...

    def skip_step(self, reason: str) -> StepRecord:
        """Spend the step without an update (``train.on_nonfinite=skip``); its record."""
        ...

    def attach_data_parallel(self, reducer: Reducer) -> None:
        """Average over ranks from now on: ZO scalars and losses, or gradients."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class NotReplayableError(TypeError):
    """A replay-only call on an estimator whose steps use gradients (not seed-replayable)."""


class DataParallelHook:
    """``attach_data_parallel``: every estimator keeps the reducer it is given."""

    reducer: Reducer | None = None
    """None in one process: nothing to average (and ZO-SGD's sync-free step stays on)."""

    def attach_data_parallel(self, reducer: Reducer) -> None:
        self.reducer = reducer


class GradientEstimator(DataParallelHook):
    """The contract's side of estimators that update from gradients: no replay records."""

    step_count: int
    last_record: StepRecord | None = None  # a gradient step is not seed-replayable

    def apply_record(self, record: StepRecord) -> None:
        raise NotReplayableError(self._not_replayable())

    def skip_step(self, reason: str) -> StepRecord:
        raise NotReplayableError(self._not_replayable())

    def _not_replayable(self) -> str:
        return (
            f"{type(self).__name__} updates from gradients, which no record reproduces: it "
            "neither replays nor skips steps (resume from its checkpoint instead)"
        )

    def _differentiable_loss(self, closure: Closure) -> tuple[Any, float]:
        """The closure's loss with grad enabled, and its value; raises when it is non-finite
        or has no graph back to a trainable tensor."""
        with torch.enable_grad():
            loss = closure()
        value = float(loss.detach())  # type: ignore[union-attr]
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"the closure returned a non-finite loss ({value}) at step {self.step_count}; "
                "lower lr or check the batch"
            )
        if not loss.requires_grad:
            raise ValueError(
                "the closure's loss does not require grad: no trainable tensor reached it "
                "(are the parameters frozen, or did the closure run under torch.no_grad()?)"
            )
        return loss, value

    def _estimate(self, loss: float) -> Estimate:
        """A first-order estimate: the loss only (the gradient is in ``.grad`` or applied)."""
        return Estimate(self.step_count, [], [], loss)

    def _mean_loss(self, loss: float) -> float:
        """The loss averaged over ranks (as it is in one process)."""
        return loss if self.reducer is None else self.reducer.mean([loss])[0]


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


def _as_float(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


@dataclass
class _Measured:
    """An estimate's scalars and losses as device fp64 tensors, not yet read."""

    step: int
    seeds: list[int]
    scalars: torch.Tensor
    losses: torch.Tensor

    def read(self) -> Estimate:
        """Read once (one device-to-host copy); a non-finite value raises."""
        values = torch.cat([self.scalars, self.losses]).tolist()
        scalars, losses = values[: len(self.seeds)], values[len(self.seeds) :]
        if not all(math.isfinite(v) for v in values):
            bad = next(v for v in losses + scalars if not math.isfinite(v))
            raise NonFiniteLossError(
                f"the closure returned a non-finite loss or estimate ({bad}) at step "
                f"{self.step}; lower eps or lr, or check the batch"
            )
        return Estimate(self.step, self.seeds, scalars, sum(losses) / len(losses))


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


@dataclass
class ZOConfig(ScaleConfig):
    """The finite-difference settings of the two-point loop, which every ZO estimator's config
    extends (each declares its own ``lr``: its default differs by method)."""

    eps: float = 1e-3
    """Perturbation scale of the finite difference."""
    weight_decay: float = 0.0
    """Decoupled L2 decay, folded into the update pass: ``W *= 1 - lr * weight_decay``."""
    queries: int = 1
    """Directions per step; the update averages them (O(1) memory: seeds are replayed)."""
    one_point: bool = False
    """``(L(W + eps z) - L(W)) / eps`` instead of the symmetric two-point difference."""


class ZOOptimizer(DataParallelHook, torch.optim.Optimizer):
    """Base class: two-point (or one-point) seed-replay estimates over param groups.

    Built from its config dataclass (:attr:`config_class`), keyword overrides of its fields,
    or both: ``ZOSGD(params, lr=1e-6, eps=1e-3, seed=0)``. Subclasses decide how the
    averaged scalars become an update by overriding :meth:`_group_coefficients` (and may
    keep state, e.g. momentum, declared as per-group settings in :meth:`_group_defaults`).
    """

    config_class: ClassVar[type]
    """The config dataclass whose fields are this estimator's settings."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        config: Any = None,
        *,
        seed: int = 0,
        engine: EngineConfig | None = None,
        **settings: Any,
    ):
        self.config = configured(self.config_class, config, settings, type(self).__name__)
        super().__init__(params, self._group_defaults(self.config))
        self.queries = self.config.queries
        self.one_point = self.config.one_point
        self.run_seed = seed
        tensors = [p for group in self.param_groups for p in group["params"]]
        self.engine = build_engine(tensors, engine)
        self.tensor_scales = tensor_scales(tensors, self.config.scale, self.config.scale_floor)
        """``estimator.scale=relative``: each tensor's fixed scale (estimators/scaling.py)."""
        self._group_indices: list[list[int]] = []
        start = 0
        for group in self.param_groups:
            self._group_indices.append(list(range(start, start + len(group["params"]))))
            start += len(group["params"])
        self.step_count = 0
        self._pending: list[Estimate] = []
        self.last_record: StepRecord | None = None

    def _group_defaults(self, config: Any) -> dict[str, Any]:
        """What each param group holds, and may override (torch.optim's ``defaults``)."""
        return {"lr": config.lr, "eps": config.eps, "weight_decay": config.weight_decay}

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
        eps = self._reference_eps()
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

    def _reference_eps(self) -> float:
        """The eps the finite difference divides by: group 0's (the other groups scale z by
        their eps ratio to it, :meth:`direction_scale`)."""
        return self.param_groups[0]["eps"]

    @torch.no_grad()
    def estimate(self, closure: Closure) -> Estimate:
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
        if self.reducer is not None:
            *scalars, loss = self.reducer.mean([*scalars, loss])
        return scalars, loss

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """``step(closure)`` = ``estimate(closure)`` then apply; ``step()`` applies the pending ones."""
        fused = self._fused_step and not self._pending and self.reducer is None
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

    def _opens(self, record: StepRecord) -> bool:
        """Whether ``record``, this step's (else ValueError), updates: a skipped step
        (:meth:`skip_step`) is spent here, with nothing changed."""
        if record.step != self.step_count:
            raise ValueError(f"record for step {record.step} applied at step {self.step_count}")
        if "skipped" in record.extra:
            self.step_count += 1
            return False
        return True

    @torch.no_grad()
    def apply_record(self, record: StepRecord) -> None:
        """Apply one recorded update; training and replay both go through here."""
        if not self._opens(record):
            return
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
