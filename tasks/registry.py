"""Tasks by name: a factory per name, options passed through as keyword arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

from tasks.base import Task, TaskError

TaskFactory = Callable[..., Task]
F = TypeVar("F", bound=TaskFactory)

_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str, factory: F | None = None) -> F | Callable[[F], F]:
    """Register `factory` (a Task subclass or a function returning a Task) under `name`.

    Use as `register_task("mine", make_mine)` or as a decorator `@register_task("mine")`.
    Registering a different factory under a taken name is an error, so two plugins cannot
    silently shadow each other.
    """

    def add(factory: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise TaskError(f"task {name!r} is already registered (by {existing!r})")
        _REGISTRY[name] = factory
        return factory

    return add if factory is None else add(factory)


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **options: object) -> Task:
    """Build the task registered as `name`; options go to its factory."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise TaskError(f"unknown task {name!r}; available tasks: {available_tasks()}")
    signature = inspect.signature(factory)
    try:
        # Bind first: a TypeError from inside the factory must not read as a bad option.
        signature.bind(**options)
    except TypeError as error:
        accepted = [p for p in signature.parameters if not p.startswith("_")]
        raise TaskError(f"task {name!r}: {error}; its options are {accepted}") from None
    return factory(**options)
