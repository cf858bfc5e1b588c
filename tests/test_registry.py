"""zo.registry: the one registry form (name, config class, impl, typed traits)."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass

import pytest

from zo.registry import Registration, Registry, UnknownNameError


@dataclass(frozen=True)
class Traits:
    replayable: bool
    memory: str = "small"


@dataclass
class Options:
    lr: float = 1e-3


class Thing:
    pass


class NoSuchThingError(ValueError):
    pass


def registry() -> Registry[Options, type[Thing], Traits]:
    things: Registry[Options, type[Thing], Traits] = Registry("thing", Traits, NoSuchThingError)
    things.register("beta", Options, Thing, replayable=True)
    things.register("alpha", Options, Thing, replayable=False, memory="large")
    return things


def test_registration_holds_name_config_impl_and_typed_traits() -> None:
    things = registry()
    got = things.get("alpha")
    assert got == Registration("alpha", Options, Thing, Traits(replayable=False, memory="large"))
    assert things.get("beta").traits == Traits(replayable=True, memory="small")  # the default
    with pytest.raises(FrozenInstanceError):
        got.traits.replayable = True  # type: ignore[misc]


def test_register_returns_the_impl() -> None:
    things: Registry[Options, type[Thing], Traits] = Registry("thing", Traits)
    assert things.register("x", Options, Thing, replayable=True) is Thing


def test_names_membership_and_iteration_are_in_name_order() -> None:
    things = registry()
    assert things.names() == ["alpha", "beta"]
    assert [r.name for r in things] == ["alpha", "beta"]
    assert "alpha" in things and "gamma" not in things
    assert len(things) == 2


def test_unknown_name_error_lists_the_choices() -> None:
    with pytest.raises(NoSuchThingError) as info:
        registry().get("gamma")
    assert str(info.value) == "unknown thing 'gamma'; choose one of ['alpha', 'beta']"


def test_default_unknown_name_error_is_a_lookup_error() -> None:
    things: Registry[Options, type[Thing], Traits] = Registry("thing", Traits)
    with pytest.raises(UnknownNameError, match=r"unknown thing 'x'; choose one of \[\]"):
        things.get("x")
    assert issubclass(UnknownNameError, LookupError)


def test_a_second_registration_of_a_name_is_refused() -> None:
    things = registry()
    with pytest.raises(ValueError, match="thing 'alpha' is already registered"):
        things.register("alpha", Options, Thing, replayable=True)
    assert things.get("alpha").traits.memory == "large"  # the first one stays


def test_unknown_trait_is_refused_at_registration() -> None:
    things = registry()
    with pytest.raises(TypeError, match=r"thing 'gamma'.*speed.*traits of a thing are"):
        things.register("gamma", Options, Thing, replayable=True, speed=3)
    assert "gamma" not in things


def test_missing_trait_is_refused_at_registration() -> None:
    things = registry()
    with pytest.raises(TypeError, match=r"thing 'gamma'.*replayable"):
        things.register("gamma", Options, Thing)
    assert "gamma" not in things


def test_traits_must_be_a_frozen_dataclass() -> None:
    @dataclass
    class Mutable:
        flag: bool

    with pytest.raises(TypeError, match="frozen dataclass"):
        Registry("thing", Mutable)
    with pytest.raises(TypeError, match="frozen dataclass"):
        Registry("thing", dict)


def test_mapping_view_is_read_only_and_follows_registrations() -> None:
    things = registry()
    view = things.as_mapping()
    assert list(view) == ["alpha", "beta"]
    things.register("gamma", Options, Thing, replayable=True)
    assert sorted(view) == ["alpha", "beta", "gamma"]
    assert view["gamma"].traits.replayable
    with pytest.raises(KeyError):
        view["delta"]
    with pytest.raises(TypeError):
        view["delta"] = view["gamma"]  # type: ignore[index]
