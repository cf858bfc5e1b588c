"""Config schema: YAML + overrides build dataclasses; bad input names the key."""

from __future__ import annotations

import pytest

from zo.config import ConfigError, RunConfig, apply_overrides, build, load_config


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_fill_the_dataclasses(tmp_path):
    path = write(tmp_path, "estimator:\n  name: zo_sgd\n  lr: 1e-6\ntrain:\n  steps: 5\n")
    config = load_config(path, ["train.steps=7", "estimator.eps=0.01", "trainable=names:*.norm*"])
    assert isinstance(config, RunConfig)
    assert config.train.steps == 7
    assert config.estimator == {"name": "zo_sgd", "lr": "1e-6", "eps": 0.01}
    assert config.trainable.kind == "names" and config.trainable.patterns == ["*.norm*"]


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key train\.stepz.*valid keys under train: \[.*'steps'"
    ):
        load_config(write(tmp_path, "train:\n  stepz: 3\n"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=many", r"train\.steps: expected an integer"),
        ("train.steps=0", r"train\.steps must be >= 1"),
        (
            "train.lr_schedule=cosine",
            r"train\.lr_schedule: 'cosine' is not one of \['constant', 'linear'\]",
        ),
        ("resume=maybe", "resume: expected true or false"),
        ("model.dtype=int8", r"model\.dtype 'int8' is not one of"),
        ("engine.distribution=uniform", r"engine.*choose one of \['gaussian', 'rademacher'\]"),
        ("trainable.kind=names", "trainable.patterns is empty"),
        ("steps", "must look like section.key=value"),
        ("train.steps.x=1", r"train\.steps: expected an integer"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_build_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        build(RunConfig, {"train": 3})


def test_overrides_do_not_mutate_their_input():
    data = {"train": {"steps": 1}}
    assert apply_overrides(data, ["train.steps=2"]) == {"train": {"steps": 2}}
    assert data == {"train": {"steps": 1}}


def test_task_keys_beside_name_become_the_tasks_options(tmp_path):
    text = "task:\n  name: jsonl\n  max_length: 64\n  path: data.jsonl\n  label: y\n"
    config = load_config(write(tmp_path, text), ["task.template={text} is"])
    assert config.task.name == "jsonl" and config.task.max_length == 64
    assert config.task.options == {"path": "data.jsonl", "label": "y", "template": "{text} is"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.colour=red"], r"task: .*unknown option\(s\) \['colour'\]; its options are"),
        (["task.name=jsonl"], r"task: .*missing option\(s\) \['path', 'template'\]"),
        (
            ["estimator.name=zo_sgd", "train.autocast=bf17"],
            r"train\.autocast: 'bf17' is not one of \['none', 'bf16', 'fp16'\]",
        ),
    ],
)
def test_bad_task_options_and_switches_fail_validation_before_any_model_loads(
    overrides, message, monkeypatch
):
    from zo import models, train

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before validation failed")

    monkeypatch.setattr(models, "load_model", no_loading)
    with pytest.raises(ConfigError, match=message):
        train.validate(load_config("experiments/tiny/smoke.yaml", overrides))
