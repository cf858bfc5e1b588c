"""Every registered estimator keeps the written contract (estimators/base.py) and carries
every trait the loop, replay, data parallelism and the memory planner read; each config
field is declared once, and each constructor takes exactly its config's fields."""

from __future__ import annotations

import dataclasses
import math

import pytest

import estimators
import tasks
from estimators.registry import EstimatorTraits
from tests.test_estimator_matrix import MATRIX, _batches, _build
from zo.memory import EstimatorMemory, PlannedEstimator
from zo.models import tiny_model

SPECS = [estimators.get_estimator(name) for name in sorted(MATRIX)]
IDS = [spec.name for spec in SPECS]


def test_traits_that_differ_by_estimator_have_no_default():
    """A registration must say these (a missing one is a TypeError at import time)."""
    required = [
        f.name for f in dataclasses.fields(EstimatorTraits) if f.default is dataclasses.MISSING
    ]
    assert required == ["zeroth_order", "replayable", "seeded", "memory"]
    with pytest.raises(TypeError, match="memory"):
        estimators.register_estimator(
            "no_memory", estimators.ZOSGDConfig, estimators.ZOSGD, zeroth_order=True
        )
    assert "no_memory" not in estimators.ESTIMATORS


def test_a_registration_names_the_config_its_class_builds_from():
    with pytest.raises(TypeError, match="builds from ZOSGDConfig"):
        estimators.register_estimator(
            "mismatched",
            estimators.get_estimator("zo_adam").config_class,
            estimators.ZOSGD,
            zeroth_order=True,
            replayable=True,
            seeded=True,
            memory=EstimatorMemory(),
        )


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_trait_is_there_and_consistent(spec):
    traits = spec.traits
    assert isinstance(traits, EstimatorTraits)
    for trait in dataclasses.fields(EstimatorTraits):
        value = getattr(traits, trait.name)
        assert isinstance(value, EstimatorMemory if trait.name == "memory" else bool), trait.name
    # what the planner reads: its memory model and attention need, from the registration only
    assert spec.planned() == PlannedEstimator(spec.name, traits.memory, traits.eager_attention)
    assert traits.memory.backward == (not traits.zeroth_order)
    assert not traits.replayable or (traits.zeroth_order and traits.seeded)
    assert dataclasses.is_dataclass(spec.config_class) and isinstance(spec.config_class, type)
    assert spec.impl.config_class is spec.config_class


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_the_built_estimator_keeps_the_contract(spec):
    model, tokenizer, optimizer = _build(spec.name, "llama")
    assert isinstance(optimizer, estimators.Estimator)
    assert optimizer.last_record is None and optimizer.step_count == 0
    batch = _batches(tokenizer, 1)[0]
    estimate = optimizer.estimate(lambda: tasks.classification_loss(model, batch))
    assert type(estimate) is estimators.Estimate and math.isfinite(estimate.loss)
    assert bool(estimate.seeds) == bool(estimate.scalars) == spec.traits.seeded
    loss = optimizer.step()
    assert isinstance(loss, float) and optimizer.step_count == 1
    if spec.traits.replayable:
        assert isinstance(optimizer.last_record, estimators.StepRecord)
        assert optimizer.last_record.seeds == estimate.seeds
    else:
        assert optimizer.last_record is None
        with pytest.raises(estimators.NotReplayableError):
            optimizer.apply_record(estimators.StepRecord(0, [], [], [], [], 0.0))


# ---------------------------------------------------------------------- settings, once
def _own_fields(config_class: type) -> set[str]:
    return set(config_class.__dict__.get("__annotations__", {}))


def _config_classes() -> list[type]:
    """Every config dataclass of a registered estimator, and every dataclass it extends."""
    found = []
    for spec in SPECS:
        for cls in spec.config_class.__mro__:
            if dataclasses.is_dataclass(cls) and cls not in found:
                found.append(cls)
    return found


@pytest.mark.parametrize("config_class", _config_classes(), ids=lambda c: c.__name__)
def test_no_config_declares_a_field_of_its_bases_again(config_class):
    inherited = {
        f.name
        for base in config_class.__mro__[1:]
        if dataclasses.is_dataclass(base)
        for f in dataclasses.fields(base)
    }
    assert not _own_fields(config_class) & inherited, "inherit the field, do not declare it again"


@pytest.mark.parametrize("base", [estimators.ZOConfig, estimators.ZOSGDConfig])
def test_configs_with_a_bases_settings_inherit_its_dataclass(base):
    """The two-point loop's settings (ZOConfig), and ZO-SGD's (block_zo, hybrid, ...): a
    config with all of a base's fields at the same defaults extends it."""
    fields = {(f.name, f.default) for f in dataclasses.fields(base)}
    for spec in SPECS:
        mine = {(f.name, f.default) for f in dataclasses.fields(spec.config_class)}
        if fields <= mine:
            assert issubclass(spec.config_class, base), spec.name


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_the_constructor_takes_exactly_the_configs_fields(spec):
    model, _ = tiny_model("llama")
    defaults = spec.config_class()
    settings = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    settings.update(MATRIX[spec.name])  # every field given, by keyword
    params = list(model.named_parameters())
    built = estimators.build_estimator(spec.name, params, model=model, **settings)
    assert isinstance(built, spec.impl)
    with pytest.raises(TypeError, match="unknown setting.*'not_a_setting'"):
        estimators.build_estimator(spec.name, params, model=model, not_a_setting=1, **settings)
    with pytest.raises(TypeError, match=spec.config_class.__name__):
        other = estimators.ZOSGDConfig if spec.name != "zo_sgd" else type("Other", (), {})
        estimators.build_estimator(spec.name, params, other(), model=model)


def test_parallel_modes_read_the_shardable_and_offloadable_traits():
    """train.parallel=fsdp / offload accept exactly the estimators registered with the trait
    (no name table in the core); these sets are what tests/test_sharded_estimators.py and
    tests/test_offload.py check against data parallelism and the plain run."""
    assert set(estimators.estimators_with("shardable")) == {
        "zo_sgd",
        "zo_sgd_sign",
        "zo_sgd_momentum",
        "zo_sgd_conservative",
        "zo_adam",
        "sgd",
        "adamw",
        "lomo",
    }
    assert set(estimators.estimators_with("offloadable")) == {
        "zo_sgd",
        "zo_sgd_sign",
        "zo_sgd_momentum",
        "zo_sgd_conservative",
        "zo_adam",
    }
