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


# --- the task registry ------------------------------------------------------------------------


def _built(name: str, tmp_path) -> object:
    """A task of every registered name, from options that need no network."""
    import tasks
    from tasks.registry import task_registration

    registration = task_registration(name)
    if registration.traits.fixtures:
        return tasks.get_task(name, fixtures=True)
    if name == "jsonl":
        data = tmp_path / "train.jsonl"
        data.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
        return tasks.get_task(
            name, path=str(data), template="{text}", verbalizer={0: " x", 1: " y"}
        )
    if name == "chat":
        data = tmp_path / "chat.jsonl"
        data.write_text('{"prompt": "a", "completion": " b"}\n')
        return tasks.get_task(name, path=str(data))
    return tasks.get_task(name)


def test_every_task_registration_has_the_traits_the_loop_reads(tmp_path) -> None:
    import tasks
    from tasks.base import KINDS, OBJECTIVES, Task
    from tasks.metrics import METRICS
    from tasks.registry import TASKS, TaskTraits, option_names

    assert sorted(TASKS) == tasks.available_tasks() and len(TASKS) >= 18
    # the package's own tasks (other tests register throwaway ones)
    shipped = {n: r for n, r in TASKS.items() if r.impl.__module__.startswith("tasks.")}
    assert {"sentiment", "jsonl", "chat", "sst2", "squad"} <= set(shipped)
    for name, registration in shipped.items():
        assert isinstance(registration.traits, TaskTraits), name
        assert registration.traits.kinds and set(registration.traits.kinds) <= set(KINDS), name
        assert option_names(registration.config_class), name
        task = _built(name, tmp_path)
        # what zo.train and tasks.evaluation read from a built task
        assert isinstance(task, Task), name
        assert task.kind in registration.traits.kinds, name
        assert task.objective in OBJECTIVES and task.metric in METRICS, name
        assert task.load("train"), name
