"""ZO-Adam: AdamW's update fed the zeroth-order gradient ``g_hat = mean_q(g_q z_q)``.

The moments live only over the trainable set, so the memory is two fp32 copies of it
(8 bytes per trainable parameter): with a sparse mask or LoRA that is small, for full
fine-tuning it is twice the model in fp32 -- the price ZO-SGD does not pay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from estimators.base import StepRecord, ZOConfig
from estimators.registry import register_estimator
from estimators.zo_variants import ChunkRule, ElementwiseZO, recorded
from zo.memory import EstimatorMemory


@dataclass
class ZOAdamConfig(ZOConfig):
    """The finite-difference settings (``eps`` is the perturbation, not Adam's epsilon: see
    adam_eps; weight decay is decoupled as in AdamW and ZO-SGD), plus Adam's:"""

    lr: float = 1e-5
    """Adam step size: each entry moves by about ``lr`` per step (less under ZO noise)."""
    beta1: float = 0.9
    """Decay of the first moment (mean of g_hat)."""
    beta2: float = 0.999
    """Decay of the second moment (mean of g_hat squared)."""
    adam_eps: float = 1e-8
    """Adam's denominator term, ``sqrt(v_hat) + adam_eps``."""


HYPERPARAMETERS = ("beta1", "beta2", "adam_eps")


class ZOAdam(ElementwiseZO):
    """``torch.optim.AdamW`` on ``g_hat``, rebuilt chunk by chunk from the step's seeds.

    Per step ``t`` (1-based) and element: ``m <- beta1 m + (1 - beta1) g``,
    ``v <- beta2 v + (1 - beta2) g^2``, ``W <- (1 - lr wd) W - lr m_hat / (sqrt(v_hat) +
    adam_eps)`` with the usual bias corrections ``m_hat = m / (1 - beta1^t)``,
    ``v_hat = v / (1 - beta2^t)``. Weight decay is decoupled (AdamW), as in ZO-SGD.

    Memory: ``state[p]["exp_avg"]`` and ``state[p]["exp_avg_sq"]``, fp32, over the
    trainable tensors only; the update itself needs one chunk per worker thread.
    """

    config_class = ZOAdamConfig
    state_keys = ("exp_avg", "exp_avg_sq")

    def _group_defaults(self, config: ZOAdamConfig) -> dict[str, Any]:
        adam = {key: getattr(config, key) for key in HYPERPARAMETERS}
        return {**super()._group_defaults(config), **adam}

    def _record_extra(self, record: StepRecord) -> dict[str, Any]:
        return {key: [group[key] for group in self.param_groups] for key in HYPERPARAMETERS}

    def _chunk_rule(self, record: StepRecord, group_index: int) -> ChunkRule:
        beta1, beta2, adam_eps = (
            recorded(record, key, group_index, self.param_groups) for key in HYPERPARAMETERS
        )
        lr = record.lrs[group_index]
        decay = 1.0 - lr * record.weight_decays[group_index]
        t = record.step + 1
        step_size = lr / (1.0 - beta1**t)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)

        def rule(weights: torch.Tensor, g_hat: torch.Tensor, state: list, scale: float) -> None:
            exp_avg, exp_avg_sq = state
            if decay != 1.0:
                weights.mul_(decay)
            exp_avg.lerp_(g_hat, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g_hat, g_hat, value=1.0 - beta2)
            denom = torch.sqrt(exp_avg_sq, out=g_hat)  # g_hat is spent: reuse its chunk
            denom.div_(bias_correction2_sqrt).add_(adam_eps)
            weights.addcdiv_(exp_avg, denom, value=-step_size * scale)

        return rule


register_estimator(
    "zo_adam",
    ZOAdamConfig,
    ZOAdam,
    zeroth_order=True,
    replayable=True,
    seeded=True,
    shardable=True,
    offloadable=True,
    memory=EstimatorMemory(state_copies=2, accumulator=True),
)
