"""Tasks: templates, verbalizers, bundled data, and candidate scoring for causal LMs.

`import tasks` stays fast (no torch, transformers or datasets): the scoring functions
are loaded on first use, and `datasets` only when a split is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks import builtin as _builtin  # noqa: F401  (registers the shipped tasks)
from tasks.base import ClassificationTask, Example, Task, TaskError
from tasks.registry import available_tasks, get_task, register_task

if TYPE_CHECKING:
    from tasks.scoring import (
        CandidateBatch,
        candidate_log_likelihoods,
        classification_loss,
        encode_candidates,
        evaluate,
        pair_log_likelihoods,
        predict,
    )

_SCORING = {
    "CandidateBatch",
    "candidate_log_likelihoods",
    "classification_loss",
    "encode_candidates",
    "evaluate",
    "pair_log_likelihoods",
    "predict",
}

__all__ = [
    "CandidateBatch",
    "ClassificationTask",
    "Example",
    "Task",
    "TaskError",
    "available_tasks",
    "candidate_log_likelihoods",
    "classification_loss",
    "encode_candidates",
    "evaluate",
    "get_task",
    "pair_log_likelihoods",
    "predict",
    "register_task",
]


def __getattr__(name: str) -> Any:
    # PEP 562: importing torch costs a second or more; only scoring needs it.
    if name in _SCORING:
        from tasks import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
