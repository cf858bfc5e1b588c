"""Learning-rate schedules (``train.lr_schedule``) over an optimizer's param groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zo.config import RunConfig


@dataclass(frozen=True)
class LRSchedule:
    """``train.lr_schedule`` over each param group's configured learning rate.

    The base rates are the estimator's as the config built it (``estimator.lr`` and the
    param groups' own ``lr``), taken before any checkpoint loads: a resumed optimizer's
    groups hold the last step's scheduled lr, and decaying from that would restart the
    decay at every resume.
    """

    kind: str
    steps: int
    base_lrs: tuple[float, ...]

    @classmethod
    def before_resume(cls, config: RunConfig, optimizer: torch.optim.Optimizer) -> LRSchedule:
        """The schedule of a freshly built ``optimizer`` (call it before ``load_state_dict``)."""
        base_lrs = tuple(float(group["lr"]) for group in optimizer.param_groups)
        return cls(config.train.lr_schedule, config.train.steps, base_lrs)

    def lrs(self, step: int) -> list[float]:
        if self.kind == "linear":
            return [base * (1.0 - step / self.steps) for base in self.base_lrs]
        return list(self.base_lrs)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        for group, lr in zip(optimizer.param_groups, self.lrs(step), strict=True):
            group["lr"] = lr
