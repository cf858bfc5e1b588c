"""What an estimator keeps in memory: a trait each estimator declares on its registration.

The planner (:mod:`zo.memory.step`) reads these values; it keeps no table of estimators.
An estimator that stores nothing new declares ``EstimatorMemory()`` (ZO-SGD's memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Gradients = Literal["none", "all", "one", "part"]


@dataclass(frozen=True)
class EstimatorMemory:
    """What a step keeps besides the weights (in units of the trainable set)."""

    gradients: Gradients = "none"
    """``none``: forward passes only (zeroth order: the engine draws directions chunk by
    chunk); ``all``: backward, and a ``.grad`` per trainable tensor; ``one``: backward, one
    gradient at a time (LOMO's fused update); ``part``: backward, and gradients of the part
    of the set a first-order optimizer trains (hybrid), the rest drawn by the engine."""
    state_copies: int = 0
    """Per-element state kept between steps: fp32 under the engine (zeroth order), the
    parameter dtype under a torch optimizer."""
    accumulator: bool = False
    """ZO updates that rebuild g_hat chunk by chunk (sign, momentum, Adam): one more chunk."""
    tangents: bool = False
    """Forward-mode AD: every activation carries a tangent of its size."""
    foreach_temp: bool = False
    """torch AdamW's multi-tensor path (CUDA) allocates sqrt(v) for the whole set at once."""
    kept_hidden_states: int = 0
    """Hidden states ([tokens, hidden]) kept through a step: block_zo's copy of the input of
    the perturbed block, reused by the step's later forwards, and the copy handed back."""
    forward_passes: float = 2.0
    """Cost of one step per example, in forward passes of the model (a backward counts two;
    ZO-SGD's two-point estimate: 2). The planner's relative cost reads it."""

    def __post_init__(self) -> None:
        if self.gradients not in ("none", "all", "one", "part"):
            raise ValueError(f"gradients must be none, all, one or part, got {self.gradients!r}")
        if self.state_copies < 0 or self.kept_hidden_states < 0 or self.forward_passes <= 0:
            raise ValueError("state_copies, kept_hidden_states >= 0 and forward_passes > 0")

    @property
    def backward(self) -> bool:
        """A step calls backward, so autograd stores activations."""
        return self.gradients != "none"


@dataclass(frozen=True)
class PlannedEstimator:
    """An estimator as the planner sees it: its name (echoed), its memory trait and whether
    it needs eager attention (both read from its registration by the caller)."""

    name: str
    memory: EstimatorMemory
    eager_attention: bool = False
