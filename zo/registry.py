"""The one registry form: ``register(name, config_class, impl, **traits)``.

Estimators, model families and model names are each one :class:`Registry`. A registration
pairs a name with the class of its options (``config_class``), what builds or is the thing
(``impl``), and its traits: a frozen dataclass, one per registry, holding everything other
modules need to know per name (an estimator's memory model, a family's default attention).
So no other module keeps a second table keyed by the same names, and a registration that
forgets a trait, or names one that does not exist, fails at import time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

C = TypeVar("C")
I = TypeVar("I")  # noqa: E741  (the impl type: a class, a builder, a loader)
T = TypeVar("T")

__all__ = ["Registration", "Registry", "UnknownNameError"]


@dataclass(frozen=True)
class Registration(Generic[C, I, T]):
    name: str
    config_class: type[C]
    impl: I
    traits: T


class UnknownNameError(LookupError):
    """A name that is not registered; the message lists the registered ones."""


class Registry(Generic[C, I, T]):
    """Registrations of one kind (``"estimator"``, ``"model family"``), by name.

    ``traits_class`` is a frozen dataclass; :meth:`register` builds it from the keyword
    traits, so a missing or unknown trait is a ``TypeError`` at registration. ``error`` is
    the exception type :meth:`get` raises, with a message that lists the registered names.
    ``registration_class`` (a subclass of :class:`Registration`) may add what a registry's
    callers derive from the traits (an estimator's planner view, say).
    """

    def __init__(
        self,
        kind: str,
        traits_class: type[T],
        error: Callable[[str], Exception] = UnknownNameError,
        registration_class: type[Registration] = Registration,
    ) -> None:
        if (
            not dataclasses.is_dataclass(traits_class)
            or not traits_class.__dataclass_params__.frozen
        ):
            raise TypeError(f"the traits of a {kind} registry must be a frozen dataclass")
        self.kind = kind
        self.traits_class = traits_class
        self.error = error
        self.registration_class = registration_class
        self._entries: dict[str, Registration[C, I, T]] = {}

    def register(self, name: str, config_class: type[C], impl: I, **traits: Any) -> I:
        """Add ``name``; a second registration of it is a ``ValueError``. Returns ``impl``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        try:
            built = self.traits_class(**traits)
        except TypeError as error:
            expected = [f.name for f in dataclasses.fields(self.traits_class)]
            raise TypeError(
                f"{self.kind} {name!r}: {error}; the traits of a {self.kind} are {expected}"
            ) from None
        self._entries[name] = self.registration_class(name, config_class, impl, built)
        return impl

    def get(self, name: str) -> Registration[C, I, T]:
        try:
            return self._entries[name]
        except KeyError:
            raise self.error(
                f"unknown {self.kind} {name!r}; choose one of {self.names()}"
            ) from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def as_mapping(self) -> Mapping[str, Registration[C, I, T]]:
        """A read-only ``name -> registration`` view that follows later registrations."""
        return _View(self)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Registration[C, I, T]]:
        """The registrations, in name order."""
        return iter([self._entries[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


class _View(Mapping[str, Registration]):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> Registration:
        return self._registry._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names())

    def __len__(self) -> int:
        return len(self._registry)

    def __repr__(self) -> str:
        return f"{self._registry.kind} registrations {self._registry.names()}"
