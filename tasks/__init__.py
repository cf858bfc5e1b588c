"""Tasks: templates, verbalizers, bundled data, and candidate scoring for causal LMs.

`import tasks` stays fast (no torch, transformers or datasets): the scoring functions
are loaded on first use, and `datasets` only when a split is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks import builtin as _builtin  # noqa: F401  (registers the shipped tasks)
from tasks.base import Example, Task, TaskError
from tasks.files import ClassificationTask
from tasks.registry import available_tasks, get_task, register_task

if TYPE_CHECKING:
    from tasks.encoding import CandidateBatch, encode_candidates
    from tasks.evaluation import evaluate, predict
    from tasks.losses import (
        batch_loss,
        candidate_log_likelihoods,
        classification_loss,
        make_batch,
        pair_log_likelihoods,
    )
    from tasks.objectives import objective_closure

# name -> the module that defines it, imported on first use
_LAZY = {
    "CandidateBatch": "tasks.encoding",
    "encode_candidates": "tasks.encoding",
    "candidate_log_likelihoods": "tasks.losses",
    "classification_loss": "tasks.losses",
    "pair_log_likelihoods": "tasks.losses",
    "make_batch": "tasks.losses",
    "batch_loss": "tasks.losses",
    "evaluate": "tasks.evaluation",
    "predict": "tasks.evaluation",
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
