"""Training objectives: the differentiable loss of a task kind, or minus a metric.

A ZO estimator only needs the closure's value at two perturbed points, never its
gradient, so it can minimise what the benchmark reports: `-F1` of greedy answers, or
`-accuracy` of argmax predictions, on the training batch (MeZO's non-differentiable
objectives). Such a closure costs a greedy decode (or a candidate scoring) per call and
is piecewise constant in the weights: most small perturbations change no prediction and
give a zero projected gradient, so it needs larger batches or eps than the loss does.

First-order estimators cannot use it: `objective_is_differentiable` tells the loop so
before training starts, and `require_differentiable` raises the error to show.

Which metric value an objective reads:

- "accuracy": the fraction of argmax predictions equal to the gold candidate
  (classification and multiple choice);
- "f1": the metric's "f1" value when it reports one (SQuAD-style F1 of generation and
  ReCoRD), else the task's score when its metric is an F1 (CB's f1_macro, MultiRC's f1a).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tasks.base import OBJECTIVES, Example, Task, TaskError, check_choice
from tasks.evaluation import EvalSettings, predictions_with_extras, summarize
from tasks.generation import GreedyConfig
from tasks.lm import model_device
from tasks.losses import batch_loss, make_batch


def task_objective(task: Task) -> str:
    return check_choice(
        f"task {task.name!r}: objective", getattr(task, "objective", "loss"), OBJECTIVES
    )


def objective_is_differentiable(task: Task) -> bool:
    """Whether the task trains on a loss with a gradient (first-order estimators need one)."""
    return task_objective(task) == "loss"


def require_differentiable(task: Task, estimator: str) -> None:
    """A clear error when a first-order `estimator` meets a metric objective."""
    if not objective_is_differentiable(task):
        raise TaskError(
            f"estimator {estimator} follows the gradient of its loss, but task "
            f"{task.name!r} has objective {task_objective(task)!r} (minus a metric of "
            "argmax or decoded predictions), which has none: use a zeroth-order "
            "estimator or set the task's objective to 'loss'"
        )


def metric_value(task: Task, summary: Mapping[str, Any], objective: str) -> float:
    """The value of `objective` in a `summarize` result (module doc)."""
    if objective in summary:
        return float(summary[objective])
    if objective == "f1" and "f1" in str(summary.get("metric", "")):
        return float(summary["score"])
    reported = sorted(k for k, v in summary.items() if isinstance(v, int | float))
    raise TaskError(
        f"task {task.name!r}: objective {objective!r} is not among what its metric "
        f"{summary.get('metric')!r} reports {reported}; choose another objective"
    )


def objective_closure(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    objective: str | None = None,
    *,
    max_length: int = 256,
    max_new_tokens: int = GreedyConfig.max_new_tokens,
) -> Callable[[], Tensor]:
    """A closure for `optimizer.step`/`estimate` on this batch: a 0-dim tensor to minimise.

    `objective` defaults to the task's. "loss" encodes the batch once and returns the
    kind's loss (differentiable); "f1"/"accuracy" return minus that metric of the model's
    current predictions on the batch, computed without gradients, on the model's device.
    """
    objective = check_choice(
        f"task {task.name!r}: objective", objective or task_objective(task), OBJECTIVES
    )
    if not examples:
        raise TaskError(f"task {task.name!r}: a batch needs at least one example")
    device = model_device(model)
    if objective == "loss":
        batch = make_batch(tokenizer, task, examples, max_length, model=model).to(device)
        return lambda: batch_loss(model, batch)
    settings = EvalSettings(
        batch_size=len(examples),
        max_length=max_length,
        greedy=GreedyConfig(max_new_tokens=max_new_tokens, max_length=max_length),
    )

    def closure() -> Tensor:
        with torch.no_grad():
            predictions, _ = predictions_with_extras(model, tokenizer, task, examples, settings)
        value = metric_value(task, summarize(task, examples, predictions), objective)
        return torch.tensor(-value, dtype=torch.float32, device=device)

    return closure
