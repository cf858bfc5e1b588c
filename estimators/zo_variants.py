"""The ZO-Bench variants of ZO-SGD: sign, momentum and conservative updates.

All three reuse the base estimate (two-point or one-point, ``queries`` directions) and
differ only in how the projected-gradient scalars become an update. With
``g_hat = scale_g * mean_q(g_q z_q)`` (``scale_g`` the per-group eps ratio, 1 with one
group), the updates are

* ``zo_sgd_sign``:         ``W <- (1 - lr wd) W - lr * sign(g_hat)``
* ``zo_sgd_momentum``:     ``m <- beta m + g_hat;  W <- (1 - lr wd) W - lr m``
* ``zo_sgd_conservative``: the best of ``W - lr g_hat`` (plain ZO-SGD), ``W`` and
  ``W + lr g_hat`` on the step's own batch.

Sign and momentum are non-linear per element, so ``g_hat`` cannot be folded into one
fused ``engine.update`` pass: it is rebuilt chunk by chunk from the seeds instead
(:class:`ElementwiseZO`), one chunk-sized accumulator per worker thread, never a full
tensor. Every update stays a pure function of the step records (plus state rebuilt by
replaying them), so ``zo replay`` reproduces a run bit for bit.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from estimators.base import Closure, StepRecord, ZOOptimizer, _as_float, call_closure
from estimators.registry import register_estimator
from estimators.zo_sgd import ZOSGD, ZOSGDConfig
from zo.engine import thread_scratch
from zo.memory import EstimatorMemory

ChunkRule = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], float], None]
"""``rule(weights_fp32, g_hat, state_chunks, step_scale)``: update one chunk in place (all
fp32); the step (not the decay) is multiplied by ``step_scale``, the tensor's scale under
``estimator.scale=relative`` (1.0 otherwise: the same arithmetic as no scale)."""


class ElementwiseZO(ZOOptimizer):
    """A ZO optimizer whose update is an elementwise function of ``g_hat`` and fp32 state.

    Subclasses name their per-element state buffers (:attr:`state_keys`, one fp32 tensor
    of the parameter's shape each, kept in ``self.state[param]`` like torch.optim) and
    give the chunk rule of one param group (:meth:`_chunk_rule`).
    """

    state_keys: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._accumulators = threading.local()

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def apply_record(self, record: StepRecord) -> None:
        if not self._opens(record):
            return
        jobs: list[Callable[[], None]] = []
        for group_index, indices in enumerate(self._group_indices):
            scale = self.direction_scale(group_index) / len(record.scalars)
            coefficients = [scale * scalar for scalar in record.scalars]
            rule = self._chunk_rule(record, group_index)
            for index in indices:
                flat = self.engine.tensors[index].detach().view(-1)
                state = [buffer.view(-1) for buffer in self._state_buffers(index)]
                step_scale = 1.0 if self.tensor_scales is None else self.tensor_scales[index]
                for chunk, start, stop in self.engine.chunks(index):
                    address = (index, chunk, start, stop)
                    update = (record.seeds, coefficients, rule, step_scale)
                    jobs.append(self._job(flat, state, address, update))
        self.engine.run_jobs(jobs, None)
        self.step_count += 1

    def _chunk_rule(self, record: StepRecord, group_index: int) -> ChunkRule:
        raise NotImplementedError

    def _job(self, flat, state, address, update) -> Callable[[], None]:
        index, chunk, start, stop = address
        seeds, coefficients, rule, step_scale = update

        def job() -> None:
            g_hat = self._g_hat_chunk(seeds, coefficients, index, chunk, stop - start, flat.device)
            piece = flat[start:stop]
            work = piece if piece.dtype == torch.float32 else piece.float()
            rule(work, g_hat, [buffer[start:stop] for buffer in state], step_scale)
            if work is not piece:
                piece.copy_(work)  # low-precision weights: computed in fp32, rounded once

        return job

    def _g_hat_chunk(self, seeds, coefficients, index, chunk, length, device) -> torch.Tensor:
        """``sum_q coefficients[q] * z_q`` over one chunk, in this thread's accumulator.

        Like :meth:`PerturbationEngine.draw`, the buffer is reused by the thread's next job.
        """
        out = thread_scratch(self._accumulators, length, device)
        for query, (seed, coefficient) in enumerate(zip(seeds, coefficients, strict=True)):
            z = self.engine.draw(seed, index, chunk, length, device)
            if query == 0:
                torch.mul(z, coefficient, out=out)
            else:
                out.add_(z, alpha=coefficient)
        return out

    # ------------------------------------------------------------------ state
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _state_buffers(self, index: int) -> list[torch.Tensor]:
        """This tensor's fp32 state buffers, created as zeros on first use: shaped like the
        engine's tensor ``index`` (the parameter, or its local shard when sharded), kept under
        the parameter as torch.optim keeps state."""
        tensor = self.engine.tensors[index]
        state = self.state[self._params()[index]]
        for key in self.state_keys:
            if key not in state:
                state[key] = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
        return [state[key] for key in self.state_keys]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim casts floating state to the parameter's dtype on load; the buffers
        # are fp32 whatever the weights are, so put the saved values back uncast. Saved
        # buffers are whole; a sharded engine's tensor keeps its shard's part.
        saved = {
            index: {
                key: self.engine.local_part(index, value) if key in self.state_keys else value
                for key, value in entries.items()
            }
            for index, entries in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "state": saved})
        for index, param in enumerate(self._params()):
            tensor = self.engine.tensors[index]
            for key in self.state_keys:
                if key in saved.get(index, {}):
                    value = saved[index][key]
                    self.state[param][key] = value.to(
                        device=tensor.device, dtype=torch.float32, copy=True
                    )


# ---------------------------------------------------------------------------- sign
@dataclass
class ZOSGDSignConfig(ZOSGDConfig):
    """ZO-SGD's options; ``lr`` is the step per element (every entry moves by exactly lr)
    and the sign is taken of the average over ``queries`` directions."""


class ZOSGDSign(ElementwiseZO):
    """ZO-SignSGD: ``W <- (1 - lr wd) W - lr * sign(g_hat)``; no state."""

    config_class = ZOSGDSignConfig

    def _chunk_rule(self, record: StepRecord, group_index: int) -> ChunkRule:
        lr = record.lrs[group_index]
        decay = 1.0 - lr * record.weight_decays[group_index]

        def rule(weights: torch.Tensor, g_hat: torch.Tensor, state: list, scale: float) -> None:
            if decay != 1.0:
                weights.mul_(decay)
            weights.add_(g_hat.sign_(), alpha=-lr * scale)

        return rule


# ---------------------------------------------------------------------------- momentum
@dataclass
class ZOSGDMomentumConfig(ZOSGDConfig):
    """ZO-SGD's options (``lr`` is the step on the momentum buffer: the effective step is
    about ``lr / (1 - momentum)``; weight decay is decoupled and does not enter m), plus:"""

    momentum: float = 0.9
    """``beta`` in ``m <- beta m + g_hat`` (torch.optim.SGD's convention, no dampening)."""


class ZOSGDMomentum(ElementwiseZO):
    """ZO-SGD with heavy-ball momentum, torch.optim.SGD's convention:

    ``m <- beta m + g_hat;  W <- (1 - lr wd) W - lr m``.

    Memory: one fp32 buffer per trainable tensor (``state[p]["momentum_buffer"]``), i.e.
    one fp32 copy of the trainable set -- 4 bytes per trainable parameter, small with a
    sparse mask or LoRA, as large as the model in fp32 for full fine-tuning. Weight decay
    is decoupled (as in ZO-SGD) rather than torch.optim.SGD's L2-into-the-gradient, so the
    buffer holds only ZO gradients and ``momentum=0`` is ZO-SGD.
    """

    config_class = ZOSGDMomentumConfig
    state_keys = ("momentum_buffer",)

    def _group_defaults(self, config: ZOSGDMomentumConfig) -> dict[str, Any]:
        return {**super()._group_defaults(config), "momentum": config.momentum}

    def _record_extra(self, record: StepRecord) -> dict[str, Any]:
        return {"momentum": [group["momentum"] for group in self.param_groups]}

    def _chunk_rule(self, record: StepRecord, group_index: int) -> ChunkRule:
        lr = record.lrs[group_index]
        decay = 1.0 - lr * record.weight_decays[group_index]
        beta = recorded(record, "momentum", group_index, self.param_groups)

        def rule(weights: torch.Tensor, g_hat: torch.Tensor, state: list, scale: float) -> None:
            (buffer,) = state
            buffer.mul_(beta).add_(g_hat)
            if decay != 1.0:
                weights.mul_(decay)
            weights.add_(buffer, alpha=-lr * scale)

        return rule


def recorded(record: StepRecord, key: str, group_index: int, groups: list[dict]) -> float:
    """A per-group hyperparameter from the record (replay stays exact under schedules)."""
    values = record.extra.get(key)
    return float(values[group_index] if values is not None else groups[group_index][key])


# ---------------------------------------------------------------------------- conservative
@dataclass
class ZOSGDConservativeConfig(ZOSGDConfig):
    """ZO-SGD's options; weight decay applies only when the weights move, and a one-point
    estimate's ``L(W)`` doubles as the "keep" candidate's loss."""


CANDIDATES: dict[str, float] = {"descend": 1.0, "keep": 0.0, "ascend": -1.0}
"""Multiplier of the ZO-SGD update per candidate, in order of preference on a tie."""


class ZOSGDConservative(ZOSGD):
    """ZO-SGD that moves only where the step's own batch says it helps (ZO-Bench's ZO-SGD-Cons).

    After the estimate, three candidates are scored on the same micro-batches: the ZO-SGD
    update ``W - lr g_hat``, the weights as they are, and the mirrored ``W + lr g_hat``
    (the estimate's sign may be wrong). The lowest mean loss wins (ties prefer that order),
    so a step never ends on a higher loss than it started from on that batch. The choice
    is stored in ``StepRecord.extra["choice"]``, which makes replay exact without data.

    Cost per step and micro-batch: the estimate's forwards plus two candidate forwards,
    plus one for ``L(W)`` in the two-point form (the one-point form has measured it).
    Candidates are evaluated functionally, never by writing and restoring the weights:
    with one query and no weight decay through ``engine.perturbed`` (per-tensor scales,
    memory as in the estimate); otherwise through ``engine.substituted`` with each module's
    candidate weight built chunk by chunk (one weight-sized temporary per module call).
    Either way a candidate is computed with the update's own arithmetic, so the accepted
    weights are the ones that were scored (bit for bit, except that ``perturbed`` adds a
    large embedding's or head's perturbation on its output: equal up to rounding). The
    split form keeps each
    micro-batch's closure until :meth:`step` so the candidates see the same batches.
    """

    config_class = ZOSGDConservativeConfig
    _fused_step = False  # the choice is made on the host from the candidates' losses

    def __init__(self, params, config: ZOSGDConservativeConfig | None = None, **settings: Any):
        super().__init__(params, config, **settings)
        self._batches: list[tuple[Closure, float | None]] = []

    @torch.no_grad()
    def estimate(self, closure: Closure):
        estimate = super().estimate(closure)
        self._batches.append((closure, estimate.loss if self.one_point else None))
        return estimate

    def _record_extra(self, record: StepRecord) -> dict[str, Any]:
        totals = dict.fromkeys(CANDIDATES, 0.0)
        for closure, base in self._batches:
            totals["keep"] += base if base is not None else self._evaluate(closure, None, 0.0)
            for name in ("descend", "ascend"):
                totals[name] += self._candidate_loss(closure, record, CANDIDATES[name])
        losses = [totals[name] / len(self._batches) for name in CANDIDATES]
        self._batches.clear()
        if self.reducer is not None:  # data parallel: the mean over ranks' batches
            losses = self.reducer.mean(losses)
        best = min(range(len(losses)), key=losses.__getitem__)  # first minimum: tie order
        return {
            "choice": list(CANDIDATES)[best],
            "candidate_losses": {
                name: loss if math.isfinite(loss) else None
                for name, loss in zip(CANDIDATES, losses, strict=True)
            },
        }

    def _candidate_loss(self, closure: Closure, record: StepRecord, direction: float) -> float:
        with self._candidate_weights(record, direction):
            loss = _as_float(call_closure(closure))
        return loss if math.isfinite(loss) else math.inf  # a diverging candidate loses

    def _candidate_weights(self, record: StepRecord, direction: float):
        per_tensor: dict[int, tuple[list[float], float]] = {}
        for group_index, indices in enumerate(self._group_indices):
            coefficients = self._coefficients(record, group_index, direction)
            decay = 1.0 - record.lrs[group_index] * record.weight_decays[group_index]
            for index in indices:
                scale = 1.0 if self.tensor_scales is None else self.tensor_scales[index]
                per_tensor[index] = ([c * scale for c in coefficients], decay)
        if len(record.seeds) == 1 and all(d == 1.0 for _, d in per_tensor.values()):
            scales = [per_tensor[i][0][0] for i in range(len(self.engine.tensors))]
            return self.engine.perturbed(record.seeds[0], scales)

        def candidate(index: int, weight: torch.Tensor) -> torch.Tensor | None:
            coefficients, decay = per_tensor[index]
            return self._candidate_weight(index, record.seeds, coefficients, decay)

        return self.engine.substituted(candidate)

    def _candidate_weight(
        self, index: int, seeds: Sequence[int], coefficients: Sequence[float], decay: float
    ) -> torch.Tensor | None:
        """``decay * W + sum_q c_q z_q`` as a new tensor, rounded exactly as the update rounds."""
        return self.engine.updated_copy(seeds, coefficients, decay, index)

    def _coefficients(self, record: StepRecord, group_index: int, direction: float) -> list[float]:
        return [direction * c for c in super()._group_coefficients(record, group_index)]

    def _group_coefficients(self, record: StepRecord, group_index: int) -> Sequence[float]:
        return self._coefficients(record, group_index, CANDIDATES[record.extra["choice"]])

    def skip_step(self, reason: str) -> StepRecord:
        self._batches.clear()
        return super().skip_step(reason)

    @torch.no_grad()
    def apply_record(self, record: StepRecord) -> None:
        choice = record.extra.get("choice")
        if "skipped" not in record.extra and choice not in CANDIDATES:
            raise ValueError(
                f"a zo_sgd_conservative record needs extra['choice'] in {list(CANDIDATES)}, "
                f"got {choice!r}; was the trajectory written by another estimator?"
            )
        if choice != "keep":
            super().apply_record(record)  # a skipped step too
        elif self._opens(record):
            self.step_count += 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._batches.clear()


_SEED_REPLAYED = dict(zeroth_order=True, replayable=True, seeded=True)
_SPREADS = dict(shardable=True, offloadable=True)
register_estimator(
    "zo_sgd_sign",
    ZOSGDSignConfig,
    ZOSGDSign,
    **_SEED_REPLAYED,
    **_SPREADS,
    memory=EstimatorMemory(accumulator=True),
)
register_estimator(
    "zo_sgd_momentum",
    ZOSGDMomentumConfig,
    ZOSGDMomentum,
    **_SEED_REPLAYED,
    **_SPREADS,
    memory=EstimatorMemory(state_copies=1, accumulator=True),
)
register_estimator(
    "zo_sgd_conservative",
    ZOSGDConservativeConfig,
    ZOSGDConservative,
    **_SEED_REPLAYED,
    **_SPREADS,
    memory=EstimatorMemory(forward_passes=5),  # two-point estimate + three candidates
)
