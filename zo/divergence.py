"""Training that diverges stops with a message, never with non-finite weights on disk.

What is checked, and what it costs:

* the loss, every step: the estimators raise on a non-finite loss before they update, and
  the loop checks the step's projected gradients (a few floats);
* the trainable tensors, only where a pass over them is worth it: before every checkpoint
  save (a checkpoint never holds a NaN or an infinity) and when the loss turns non-finite
  (to say whether the weights or the batch are to blame). Checking them after every step
  would add a pass over the trainable set per step, a third of a ZO step's update work.

``train.on_nonfinite=stop`` (the default) raises :class:`TrainingDivergedError` (``zo``
exits with code 3); ``skip`` spends the step without an update when its loss is non-finite
and the weights are still finite (the trajectory records the skip, so replay repeats it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from zo.config import RunConfig

DIVERGED_EXIT = 3
"""Exit code of ``zo train`` when training diverged (non-finite loss or weights)."""

FLAT_STEPS = 5
"""Consecutive steps with an exactly zero projected gradient before the loop warns."""

SKIPPED_IN_A_ROW = 10
"""Consecutive skipped steps after which ``skip`` stops too: the run is not recovering."""


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite loss or non-finite weights; ``zo`` exits with code 3."""


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one pass over each)."""
    return [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]


class DivergenceGuard:
    """The loop's checks for non-finite values, and the one warning about a flat loss.

    ``settings`` names what a user would change (``"estimator.lr=0.001, estimator.eps=0.001"``)
    for the messages; ``log`` prints the warning.
    """

    def __init__(self, policy: str, settings: str, log: Callable[[str], None]):
        self.policy = policy
        self.settings = settings
        self.log = log
        self.saved_step: int | None = None
        """The step of the last checkpoint known to hold finite weights (None: none yet)."""
        self._skipped_in_a_row = 0
        self._flat_since: int | None = None
        self._warned = False

    @classmethod
    def for_run(cls, config: RunConfig, log: Callable[[str], None]) -> DivergenceGuard:
        """The guard of a run, its messages naming the settings a user would change."""
        named = [k for k in ("lr", "eps") if k in config.estimator]
        keys = [f"estimator.{k}={_number(config.estimator[k])}" for k in named]
        settings = ", ".join([*keys, f"model.dtype={config.model.dtype}"])
        return cls(config.train.on_nonfinite, settings, log)

    # ------------------------------------------------------------------ the loss
    def step_failed(
        self,
        step: int,
        error: BaseException,
        tensors: Mapping[str, torch.Tensor],
        loss: bool,
        can_skip: bool,
    ) -> str:
        """A step raised a floating-point error before updating: a non-finite ``loss``, or
        another overflow (a gradient's). Raises unless the step is skipped (``skip``, a
        non-finite loss, an optimizer that ``can_skip``); returns the reason to record."""
        broken = nonfinite_tensors(tensors)
        if broken:
            self.diverged(step, f"the weights are non-finite ({_names(broken)})", _UPDATE_HINT)
        if not loss:
            self.diverged(step, f"{error} (the weights are finite)", _UPDATE_HINT)
        what = f"the loss is non-finite while the weights are finite ({error})"
        if self.policy != "skip" or not can_skip:
            self.diverged(step, what, _LOSS_HINT)
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row >= SKIPPED_IN_A_ROW:
            what = f"{SKIPPED_IN_A_ROW} steps in a row were skipped, the last because {what}"
            self.diverged(step, what, _LOSS_HINT)
        return f"non-finite loss: {error}"

    def after_step(self, step: int, loss: float, scalars: Sequence[float] | None) -> None:
        """Check what a finished step reported (loss, projected gradients): cheap, every step."""
        self._skipped_in_a_row = 0
        values = [loss, *(scalars or [])]
        if not all(math.isfinite(v) for v in values):
            self.diverged(
                step,
                f"the step's loss or projected gradient is non-finite ({values}) and its "
                "update has been applied",
                _UPDATE_HINT,
            )
        if not scalars or any(scalars):
            self._flat_since = None
            return
        if self._flat_since is None:
            self._flat_since = step
        if not self._warned and step - self._flat_since + 1 >= FLAT_STEPS:
            self._warned = True
            self.log(
                f"warning: the projected gradient was exactly 0 for {FLAT_STEPS} steps in a "
                f"row (steps {self._flat_since}-{step}): the loss did not change under "
                f"perturbation. Either eps is too small for the weights' dtype (raise "
                f"estimator.eps), or the weights collapsed after a too large step (lower "
                f"estimator.lr). Now: {self.settings}"
            )

    # ------------------------------------------------------------------ the weights
    def check_before_save(self, step: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise instead of saving non-finite weights (a pass over the trainable tensors)."""
        broken = nonfinite_tensors(tensors)
        if broken:
            self.diverged(step - 1, f"the weights are non-finite ({_names(broken)})", _UPDATE_HINT)

    def saved(self, step: int) -> None:
        self.saved_step = step

    # ------------------------------------------------------------------ the message
    def diverged(self, step: int, what: str, advice: str) -> None:
        kept = (
            f"the last checkpoint (step {self.saved_step}) holds finite weights"
            if self.saved_step
            else "no checkpoint was written"
        )
        raise TrainingDivergedError(
            f"training diverged at step {step}: {what}. Nothing non-finite was saved; {kept}. "
            + advice.format(settings=self.settings)
        )


_UPDATE_HINT = (
    "An update overflowed: lower estimator.lr (now {settings}) and start a new run "
    "(another train.out)"
)
_LOSS_HINT = (
    "A perturbed forward overflowed, or the batch itself gives a non-finite loss: lower "
    "estimator.eps or estimator.lr (now {settings}) in a new run, or skip such steps: "
    "resume=true train.on_nonfinite=skip"
)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _number(value: object) -> str:
    """A setting as a number reads (YAML may hand "1e-6" over as text)."""
    try:
        return f"{float(value):g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
