"""LOMO (Lv et al., 2023): SGD fused into backward, so at most one gradient is alive.

Each trainable tensor gets a ``register_post_accumulate_grad_hook`` for the duration of a
backward. The hook fires once the tensor's gradient is complete (a tied weight, used by the
embedding and the LM head, fires once with the sum of both uses), updates the tensor in
fp32 (rounded once to its dtype) and frees ``.grad`` at once. Gradients therefore never
exist for the whole model, only for the tensor being updated.

**Two passes.** Backward reaches the first layers last, so a fused update cannot know the
global gradient norm, nor that no gradient overflowed, until every tensor but the first
layers' has already changed. Gradient-norm clipping and fp16 loss scaling (an overflow
must skip the *whole* step) therefore run, as published, a first backward with
``retain_graph=True`` that only measures (per-tensor norms, finiteness) and frees each
gradient, then a second backward over the retained graph that updates. Cost: one more
backward, i.e. about two forwards of compute (a step is forward + 2 backwards, roughly 5
forward-equivalents instead of 3), plus one recompute of every checkpointed segment under
gradient checkpointing. Memory: the activations are kept until the second backward frees
them, which is what a single backward starts from anyway, so the peak barely moves
(measured: experiments/bench_first_order_memory.py). Recomputing the forward instead of
retaining the graph would cost one more forward for the same peak, hence retain. Without
clipping or loss scaling one backward does it all; a non-finite gradient is then only
caught by the loss check (a finite loss with an infinite gradient corrupts the weights,
as with plain SGD).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from estimators.base import Closure, Estimate, GradientEstimator
from estimators.registry import register_estimator
from estimators.settings import configured
from zo.memory import EstimatorMemory
from zo.sharded_optim import gradient_hook, is_sharded


class GradientOverflowError(FloatingPointError):
    """A gradient is non-finite even at the smallest allowed loss scale."""


@dataclass
class LOMOConfig:
    lr: float = 1e-3
    """SGD step size: ``W <- W - lr * (grad + weight_decay * W)``."""
    weight_decay: float = 0.0
    """L2 weight decay, added to the gradient as ``torch.optim.SGD`` does."""
    clip_grad_norm: float | None = None
    """Scale the gradient to at most this global L2 norm (two backward passes)."""
    clip_grad_value: float | None = None
    """Clamp every gradient entry to ``[-v, v]`` (before the norm is measured)."""
    loss_scale: Literal["auto", "dynamic", "off"] = "auto"
    """Dynamic loss scaling: ``auto`` turns it on when a trainable tensor is fp16 (two
    backward passes, overflowing steps are skipped)."""
    initial_loss_scale: float = 2.0**16
    """Starting loss scale when scaling is on."""
    loss_scale_window: int = 1000
    """Steps without overflow after which the loss scale doubles."""
    min_loss_scale: float = 1.0
    """The loss scale never halves below this; an overflow there is an error."""


@dataclass
class DynamicLossScaler:
    """Halve on overflow (the step is skipped), double after ``window`` clean steps."""

    scale: float
    window: int
    min_scale: float
    clean_steps: int = 0
    skipped_steps: int = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            if self.scale <= self.min_scale:
                raise GradientOverflowError(
                    f"a gradient overflows even at the minimum loss scale {self.min_scale}; "
                    "lower lr, lower min_loss_scale, or train in bf16/fp32"
                )
            self.scale = max(self.scale / 2, self.min_scale)
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.window:
            self.scale *= 2
            self.clean_steps = 0


class LOMO(GradientEstimator, torch.optim.Optimizer):
    """``estimate(closure)`` runs forward, backward and the fused update; ``step()`` closes it.

    There is nothing to accumulate (each gradient is gone once applied), so a second
    ``estimate`` before ``step`` is an error. ``last_record`` stays None: a gradient step
    is not seed-replayable. Parameters of the model that are not in this optimizer must
    have ``requires_grad=False``, else their gradients accumulate as usual.
    """

    config_class = LOMOConfig

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        config: LOMOConfig | None = None,
        **settings: Any,
    ):
        c = configured(LOMOConfig, config, settings, "LOMO")
        if c.loss_scale not in ("auto", "dynamic", "off"):
            raise ValueError(f"loss_scale must be 'auto', 'dynamic' or 'off', got {c.loss_scale!r}")
        if not 0 < c.min_loss_scale <= c.initial_loss_scale:
            raise ValueError(
                f"need 0 < min_loss_scale <= initial_loss_scale, got {c.min_loss_scale} and "
                f"{c.initial_loss_scale}"
            )
        super().__init__(params, {"lr": c.lr, "weight_decay": c.weight_decay})
        self._check_params_require_grad()
        self.clip_grad_norm = c.clip_grad_norm
        self.clip_grad_value = c.clip_grad_value
        has_fp16 = any(p.dtype == torch.float16 for p in self._params())
        self.scaler = (
            DynamicLossScaler(c.initial_loss_scale, c.loss_scale_window, c.min_loss_scale)
            if c.loss_scale == "dynamic" or (c.loss_scale == "auto" and has_fp16)
            else None
        )
        self.step_count = 0
        self.last_grad_norm: float | None = None
        """Global gradient norm (unscaled, after value clipping) when the first pass ran."""
        self.last_step_skipped = False
        """True when the last estimate found an overflow and left every weight as it was."""
        self._pending_loss: float | None = None
        self._clip_coefficient: torch.Tensor | None = None
        self._scale = 1.0

    # ------------------------------------------------------------------ plumbing
    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _check_params_require_grad(self) -> None:
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"], strict=True):
                if not p.requires_grad:
                    label = name or f"a {tuple(p.shape)} tensor"
                    raise ValueError(
                        f"LOMO updates inside backward, but {label} has requires_grad=False and "
                        "would never be updated: pass only trainable tensors"
                    )

    @property
    def two_pass(self) -> bool:
        """Whether a measuring backward runs before the updating one."""
        return self.clip_grad_norm is not None or self.scaler is not None

    @contextlib.contextmanager
    def _hooks(self, hook: Callable[[dict[str, Any], torch.Tensor], None]) -> Iterator[None]:
        handles = [
            gradient_hook(p, functools.partial(hook, group))  # FSDP2 shards: after reduce
            for group in self.param_groups
            for p in group["params"]
        ]
        try:
            yield
        finally:  # never leave a hook behind: a later backward elsewhere must not update
            for handle in handles:
                handle.remove()

    def _take_gradient(self, param: torch.Tensor) -> torch.Tensor:
        """The fp32, unscaled, value-clipped gradient; ``param.grad`` is freed."""
        grad = param.grad
        param.grad = None
        # fp32 gradients are modified in place: nothing else holds them once .grad is cleared
        grad = grad if grad.dtype == torch.float32 else grad.float()
        # every rank fires its hooks in the same order; FSDP2 reduce-scattered a sharded one
        if self.reducer is not None and not is_sharded(grad):
            self.reducer.mean_(grad)
        if self._scale != 1.0:
            grad.div_(self._scale)
        if self.clip_grad_value is not None:
            grad.clamp_(-self.clip_grad_value, self.clip_grad_value)
        return grad

    @torch.no_grad()
    def _measure(self, norms: list[torch.Tensor], group: dict[str, Any], param: torch.Tensor):
        norm = torch.linalg.vector_norm(self._take_gradient(param))
        norms.append(norm.full_tensor() if is_sharded(norm) else norm)  # over all shards

    @torch.no_grad()
    def _update(self, group: dict[str, Any], param: torch.Tensor) -> None:
        grad = self._take_gradient(param)
        if self._clip_coefficient is not None:
            grad.mul_(self._clip_coefficient.to(grad.device))
        lr, weight_decay = group["lr"], group["weight_decay"]
        # fp32 math, one rounding to the parameter's dtype
        weight = param if param.dtype == torch.float32 else param.float()
        if weight_decay:
            grad.add_(weight, alpha=weight_decay)
        weight.add_(grad, alpha=-lr)
        if weight is not param:
            param.copy_(weight)

    # ------------------------------------------------------------------ the step
    def estimate(self, closure: Closure) -> Estimate:
        """Forward, backward and the update fused into it; the (unscaled) loss."""
        if self._pending_loss is not None:
            raise RuntimeError(
                "LOMO updates the weights inside backward and cannot accumulate estimates: "
                "call step() after each estimate() (raise the batch size instead of grad_accum)"
            )
        for p in self._params():  # stale gradients from elsewhere must not leak into the step
            p.grad = None
        loss, value = self._differentiable_loss(closure)
        self._scale = self.scaler.scale if self.scaler is not None else 1.0
        scaled = loss.float() * self._scale if self.scaler is not None else loss
        self.last_step_skipped = False
        self._clip_coefficient = None
        try:
            if self.two_pass and not self._first_pass(scaled):
                self.last_step_skipped = True
            else:
                with self._hooks(self._update):
                    scaled.backward()
                if self.scaler is not None:
                    self.scaler.update(overflow=False)
        finally:
            self._clip_coefficient = None
        self._pending_loss = value
        return self._estimate(value)

    def _first_pass(self, scaled: torch.Tensor) -> bool:
        """Measure the global norm without updating; False when the step must be skipped."""
        norms: list[torch.Tensor] = []
        with self._hooks(functools.partial(self._measure, norms)):
            scaled.backward(retain_graph=True)
        if not norms:
            raise ValueError("backward reached none of the optimizer's tensors")
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        self.last_grad_norm = float(total)  # one sync: the skip decision needs it on the host
        if not math.isfinite(self.last_grad_norm):
            if self.scaler is None:
                raise FloatingPointError(
                    f"the gradient norm is {self.last_grad_norm} at step {self.step_count} "
                    "(no weight was changed); lower lr or check the batch"
                )
            self.scaler.update(overflow=True)
            return False
        if self.clip_grad_norm is not None:
            # as torch.nn.utils.clip_grad_norm_: coefficient max/(norm+1e-6), at most 1
            self._clip_coefficient = (self.clip_grad_norm / (total + 1e-6)).clamp(max=1.0)
        return True

    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """``step(closure)`` = ``estimate(closure)`` then ``step()``; returns the loss."""
        if closure is not None:
            self.estimate(closure)
        if self._pending_loss is None:
            raise RuntimeError("step() without a closure needs an estimate() first")
        loss, self._pending_loss = self._pending_loss, None
        self.step_count += 1
        return self._mean_loss(loss)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lomo"] = {
            "step_count": self.step_count,
            "loss_scaler": asdict(self.scaler) if self.scaler is not None else None,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if "lomo" not in state_dict:
            raise ValueError("this state_dict was not saved by LOMO (no 'lomo' entry)")
        lomo_state = state_dict.pop("lomo")
        scaler_state = lomo_state["loss_scaler"]
        if (scaler_state is None) != (self.scaler is None):
            saved = "with" if scaler_state is not None else "without"
            raise ValueError(
                f"the state was saved {saved} loss scaling and this LOMO is the other way; "
                "keep loss_scale and the parameter dtypes of the run being resumed"
            )
        super().load_state_dict(state_dict)
        self.step_count = lomo_state["step_count"]
        if scaler_state is not None:
            self.scaler = DynamicLossScaler(**scaler_state)
        self._pending_loss = None


register_estimator(
    "lomo",
    LOMOConfig,
    LOMO,
    zeroth_order=False,
    replayable=False,
    seeded=False,
    grad_accum=False,
    shardable=True,
    memory=EstimatorMemory(gradients="one", forward_passes=3),
)
