"""Tasks by name, on the one registry form of :mod:`zo.registry` (its only import of ours).

``register_task(name, config_class, impl, **traits)``, one call per task at the bottom of
the module that defines it (PEFT style):

- ``config_class``: a dataclass of the task's options (a ``SuiteTask`` subclass is itself
  that dataclass);
- ``impl``: builds the :class:`~tasks.base.Task` from an instance of ``config_class``;
- traits (:class:`TaskTraits`): what other modules need to know per task name.

``get_task(name, **options)`` checks the option names against the dataclass's fields (an
unknown or missing one is a TaskError listing the valid ones), builds the options, then
the task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from tasks.base import KINDS, Task, TaskError
from zo.registry import Registration, Registry

__all__ = [
    "TASKS",
    "TaskRegistration",
    "TaskTraits",
    "available_tasks",
    "get_task",
    "option_names",
    "register_task",
    "task_registration",
    "the_options",
]


@dataclass(frozen=True)
class TaskTraits:
    """What other modules need to know about a task name before building it."""

    kinds: tuple[str, ...]
    """The kinds (`tasks.base.KINDS`) a task of this name can have; several where its
    options choose (`jsonl`: a verbalizer makes a classification task, a target a
    generation task)."""
    fixtures: bool
    """Whether the option `fixtures=True` reads the few rows shipped with the package
    (tests, demos, `zo bench eval`), so the task needs no data of the user's."""


TaskBuilder: TypeAlias = Callable[[Any], Task]
TaskRegistration: TypeAlias = Registration[Any, TaskBuilder, TaskTraits]

_TASKS: Registry[Any, TaskBuilder, TaskTraits] = Registry("task", TaskTraits, TaskError)
TASKS: Mapping[str, TaskRegistration] = _TASKS.as_mapping()
"""Read-only ``name -> registration`` view of the registered tasks."""


def the_options(options: Task) -> Task:
    """The ``impl`` of a task whose options dataclass is the task itself (the suite's)."""
    return options


def register_task(name: str, config_class: type, impl: TaskBuilder, **traits: Any) -> TaskBuilder:
    """Add a task (traits: :class:`TaskTraits`); a second registration of ``name`` is an
    error, so two plugins cannot silently shadow each other. Returns ``impl``."""
    if not dataclasses.is_dataclass(config_class) or not isinstance(config_class, type):
        raise TypeError(f"task {name!r}: config_class must be a dataclass of its options")
    kinds = traits.get("kinds", ())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise TypeError(f"task {name!r}: kinds {kinds!r} must be a non-empty subset of {KINDS}")
    try:
        return _TASKS.register(name, config_class, impl, **traits)
    except ValueError as error:
        raise TaskError(str(error)) from None


def task_registration(name: str) -> TaskRegistration:
    return _TASKS.get(name)


def available_tasks() -> list[str]:
    return _TASKS.names()


def option_names(config_class: type) -> list[str]:
    """The options a task takes: the init fields of its options dataclass, in order."""
    return [
        f.name for f in dataclasses.fields(config_class) if f.init and not f.name.startswith("_")
    ]


def _required(config_class: type) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(config_class)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` from its options (module doc)."""
    registration = _TASKS.get(name)
    accepted = option_names(registration.config_class)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TaskError(f"task {name!r}: unknown option(s) {unknown}; its options are {accepted}")
    missing = [option for option in _required(registration.config_class) if option not in options]
    if missing:
        raise TaskError(f"task {name!r}: missing option(s) {missing}; its options are {accepted}")
    task = registration.impl(registration.config_class(**options))
    if task.kind not in registration.traits.kinds:
        raise TaskError(
            f"task {name!r} built a {task.kind} task, but its registration says "
            f"{list(registration.traits.kinds)}"
        )
    return task
