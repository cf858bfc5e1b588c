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
    from tasks.evaluation import batch_loss, evaluate, make_batch
    from tasks.objectives import objective_closure
    from tasks.scoring import (
        CandidateBatch,
        candidate_log_likelihoods,
        classification_loss,
        encode_candidates,
        pair_log_likelihoods,
        predict,
    )

# name -> the module that defines it, imported on first use
_LAZY = {
    "CandidateBatch": "tasks.scoring",
    "candidate_log_likelihoods": "tasks.scoring",
    "classification_loss": "tasks.scoring",
    "encode_candidates": "tasks.scoring",
    "pair_log_likelihoods": "tasks.scoring",
    "predict": "tasks.scoring",
    "evaluate": "tasks.evaluation",
    "make_batch": "tasks.evaluation",
    "batch_loss": "tasks.evaluation",
    "objective_closure": "tasks.objectives",
}

__all__ = [
    "CandidateBatch",
    "ClassificationTask",
    "Example",
    "Task",
    "TaskError",
    "available_tasks",
    "batch_loss",
    "candidate_log_likelihoods",
    "classification_loss",
    "encode_candidates",
    "evaluate",
    "get_task",
    "make_batch",
    "objective_closure",
    "pair_log_likelihoods",
    "predict",
    "register_task",
]


def __getattr__(name: str) -> Any:
    # PEP 562: importing torch costs a second or more; only scoring and evaluation need it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
