"""Hybrid: first-order on a chosen part of the trainable set, ZO-SGD on the rest, one step.

The first-order part is named by fnmatch patterns over parameter names (``lm_head.*``,
``*.layers.11.*``). Per micro-batch, :meth:`Hybrid.estimate` runs

1. ZO-SGD's two-point (or one-point) estimate over the ZO part, the first-order part held
   at its current value (the engine does not know those tensors, so it never perturbs them);
2. one forward + backward in which only the first-order tensors require grad, so backward
   stops where they stop and gradients exist only for them.

:meth:`Hybrid.step` applies ZO-SGD's seed-replayable update to the ZO part and an ``sgd`` or
``adamw`` step (``first_order_optimizer``, at ``first_order_lr``) to the first-order part,
both computed at the same weights.

Memory over ZO-SGD: the first-order part's gradients (and AdamW's two moments for it), plus
the activations that backward needs, i.e. those from the first first-order tensor on (the
head alone: the last hidden states and logits at the scored positions; a middle layer:
every later layer's activations). Time: ZO-SGD's forwards plus one forward and a backward
through the first-order part's depth.

Replay: the first-order part's update depends on gradients, not seeds, so a hybrid run is
registered ``zeroth_order=False``: the loop refuses ``zo replay`` and writes no trajectory
(``last_record`` is None). The ZO part's own record, enough to replay that part alone onto
the checkpointed first-order tensors, is exposed as :attr:`Hybrid.zo_record` and replays
with ``hybrid.zeroth.apply_record(record)``.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from estimators.base import Closure, Estimate, GradientEstimator, Reducer, StepRecord
from estimators.first_order import SGD, AdamW
from estimators.registry import register_estimator
from estimators.settings import configured, narrowed
from estimators.zo_sgd import ZOSGD, ZOSGDConfig
from zo.engine import EngineConfig
from zo.memory import EstimatorMemory

FIRST_ORDER_OPTIMIZERS: dict[str, type[SGD] | type[AdamW]] = {"sgd": SGD, "adamw": AdamW}
"""The first-order part's optimizer by name; each takes ``lr`` and ``weight_decay`` (the
rest keep the estimator's defaults: AdamW's betas 0.9/0.999, SGD without momentum)."""


class HybridSplitError(ValueError):
    """The parameters cannot be split into a first-order part and a ZO part as asked."""


@dataclass
class HybridConfig(ZOSGDConfig):
    """ZO-SGD's options (lr, eps, weight_decay, queries, one_point) for the ZO part, plus
    the first-order part and its optimizer."""

    first_order: list[str] = field(default_factory=list)
    """fnmatch patterns over parameter names trained with gradients (e.g. ``["lm_head.*"]``);
    required (the optimizer refuses an empty list: there is no sensible default part), every
    pattern must match a trainable tensor, and some tensor must be left for ZO."""
    first_order_optimizer: str = "sgd"
    """First-order part's optimizer: ``sgd`` or ``adamw``."""
    first_order_lr: float = 1e-3
    """First-order part's learning rate (the ``sgd`` estimator's default)."""
    first_order_weight_decay: float = 0.0
    """First-order part's weight decay (SGD: L2 in the gradient; AdamW: decoupled)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # An empty first_order is refused by the optimizer, not here: build_estimator builds
        # the defaults first and applies its keyword overrides afterwards.
        check_optimizer(self.first_order_optimizer)


def check_optimizer(optimizer: str) -> None:
    if optimizer not in FIRST_ORDER_OPTIMIZERS:
        raise HybridSplitError(
            f"first_order_optimizer {optimizer!r} is unknown; choose one of "
            f"{sorted(FIRST_ORDER_OPTIMIZERS)}"
        )


def split_groups(
    groups: list[dict[str, Any]], patterns: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(ZO groups, first-order groups): each input group split by name, order kept.

    ZO groups keep the group's own settings (lr, eps, ...); first-order groups get the
    ``first_order_*`` settings, so they carry only their tensors and names.
    """
    zeroth, first = [], []
    names = [n for group in groups for n in group.get("param_names") or []]
    for group in groups:
        if "param_names" not in group:
            raise HybridSplitError(
                "hybrid selects its first-order part by parameter name: pass named parameters "
                "(model.named_parameters(), or groups of (name, tensor) pairs)"
            )
        picked = [
            any(fnmatch.fnmatchcase(n, pat) for pat in patterns) for n in group["param_names"]
        ]
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        for is_first, target, extra in ((False, zeroth, settings), (True, first, {})):
            members = [
                (n, p)
                for n, p, flag in zip(group["param_names"], group["params"], picked, strict=True)
                if flag == is_first
            ]
            if members:
                target.append(
                    {
                        "params": [p for _, p in members],
                        "param_names": [n for n, _ in members],
                        **extra,
                    }
                )
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
        raise HybridSplitError(
            f"first_order patterns {unmatched} match no trainable tensor; names look like: "
            f"{', '.join(names[:6])}"
        )
    if not zeroth:
        raise HybridSplitError(
            f"first_order patterns {patterns} match every trainable tensor, leaving nothing "
            "for ZO: use the sgd or adamw estimator instead"
        )
    return zeroth, first


@contextlib.contextmanager
def gradients_only_for(wanted: list[torch.Tensor], others: list[torch.Tensor]) -> Iterator[None]:
    """``requires_grad`` on exactly ``wanted`` for the duration (restored afterwards)."""
    saved = [(p, p.requires_grad) for p in [*wanted, *others]]
    try:
        for p in wanted:
            p.requires_grad_(True)
        for p in others:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class Hybrid(GradientEstimator, torch.optim.Optimizer):
    """ZO-SGD over the ZO part (:attr:`zeroth`) and SGD/AdamW over the first-order part
    (:attr:`first`) in one ``estimate``/``step``.

    ``param_groups`` lists the ZO groups, then the first-order groups (the same dicts the
    two inner optimizers use), so an lr schedule that scales every group's ``lr`` scales
    ``lr`` and ``first_order_lr`` alike. Groups cannot be added after construction.
    """

    config_class = HybridConfig

    def __init__(
        self,
        params: Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]],
        config: HybridConfig | None = None,
        *,
        seed: int = 0,
        engine: EngineConfig | None = None,
        **settings: Any,
    ):
        c = configured(HybridConfig, config, settings, "Hybrid")
        patterns = list(c.first_order)
        if not patterns:
            raise HybridSplitError(
                "hybrid needs first_order patterns naming the part trained with gradients, "
                "e.g. first_order: ['lm_head.*']; with none it is zo_sgd"
            )
        super().__init__(params, {})  # normalises tensors / named pairs / dicts into groups
        zeroth_groups, first_groups = split_groups(self.param_groups, patterns)
        self.first_order_patterns = patterns
        self.zeroth = ZOSGD(zeroth_groups, narrowed(c, ZOSGDConfig), seed=seed, engine=engine)
        self.first = FIRST_ORDER_OPTIMIZERS[c.first_order_optimizer](
            first_groups, lr=c.first_order_lr, weight_decay=c.first_order_weight_decay
        )
        self.first_order_optimizer = c.first_order_optimizer
        self._zeroth_tensors = [p for g in self.zeroth.param_groups for p in g["params"]]
        self._first_tensors = [p for g in self.first.param_groups for p in g["params"]]
        self.step_count = 0  # last_record stays None (not seed-replayable): see zo_record
        self.zo_record: StepRecord | None = None
        """The ZO part's record of the last step (its seeds and scalars)."""
        self._share_groups()

    def _share_groups(self) -> None:
        self.param_groups = [*self.zeroth.param_groups, *self.first.param_groups]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "zeroth"):  # torch.optim.Optimizer.__init__ adds the initial groups
            raise NotImplementedError("hybrid splits its groups once, at construction")
        super().add_param_group(param_group)

    def attach_data_parallel(self, reducer: Reducer) -> None:
        """The ZO part averages its scalars, the first-order part its gradients."""
        self.zeroth.attach_data_parallel(reducer)
        self.first.attach_data_parallel(reducer)

    # ------------------------------------------------------------------ estimate / step
    def estimate(self, closure: Closure) -> Estimate:
        """ZO estimate of the ZO part, then forward + backward for the first-order part."""
        estimate = self.zeroth.estimate(closure)
        with gradients_only_for(self._first_tensors, self._zeroth_tensors):
            self.first.estimate(closure)
        return estimate

    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """``step(closure)`` = ``estimate(closure)`` then apply both updates; returns the
        mean loss at the unperturbed weights (the first-order forwards')."""
        if closure is not None:
            self.estimate(closure)
        self.zeroth.step()
        loss = self.first.step()
        self.zo_record = self.zeroth.last_record
        self.step_count += 1
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "hybrid": {
                "step_count": self.step_count,
                "first_order": self.first_order_patterns,
                "first_order_optimizer": self.first_order_optimizer,
                "first_order_names": self._names(self.first),
            },
            "zeroth_order": self.zeroth.state_dict(),
            "first_order": self.first.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ours = state_dict["hybrid"]
        mine = (self.first_order_optimizer, self._names(self.first))
        saved = (ours["first_order_optimizer"], ours["first_order_names"])
        if saved != mine:
            raise ValueError(
                f"optimizer state was saved by a hybrid with first-order optimizer {saved[0]!r} "
                f"over {saved[1][:4]}..., this one has {mine[0]!r} over {mine[1][:4]}...; "
                "keep first_order and first_order_optimizer when resuming"
            )
        self.zeroth.load_state_dict(state_dict["zeroth_order"])
        self.first.load_state_dict(state_dict["first_order"])
        self.step_count = ours["step_count"]
        self._share_groups()  # torch's load_state_dict replaced the inner group dicts

    @staticmethod
    def _names(optimizer: torch.optim.Optimizer) -> list[str]:
        return [n for g in optimizer.param_groups for n in g["param_names"]]


register_estimator(
    "hybrid",
    HybridConfig,
    Hybrid,
    zeroth_order=False,  # its first-order part calls backward
    replayable=False,  # that part's update uses gradients; the ZO part's: zo_record
    seeded=True,
    memory=EstimatorMemory(gradients="part", forward_passes=5),
)
