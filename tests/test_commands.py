"""The command line as users meet it: --version, each verb's help, overrides, run-file modes."""

from __future__ import annotations

import argparse
import ast
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

import zo
from zo.commands import VERBS, main, make_parser
from zo.config import apply_overrides, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "experiments" / "tiny" / "smoke.yaml")


def help_of(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"zo {zo.__version__}"


def _parsers(verb: str) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """The verb's parser and those of its sub-verbs (``bench step``, ``bench memory``...)."""
    found, todo = [], [((), make_parser(verb))]
    while todo:
        path, parser = todo.pop()
        if path:
            found.append((path, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [((*path, name), sub) for name, sub in action.choices.items()]
                if not path:  # the top parser: only the verb's own branch is built in full
                    todo = [(p, sub) for p, sub in todo if p == (verb,)]
    return found


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_help_shows_its_defaults_and_an_example(verb, capsys):
    parsers = _parsers(verb)
    assert len(parsers) > (verb == "bench") * 5  # bench: step, memory, ops, generators, ...
    for path, parser in parsers:
        name = "zo " + " ".join(path)
        text = help_of(*path, capsys=capsys)
        assert f"example:\n  {name}" in text, f"{name}: no example"
        flat = " ".join(text.split())
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(
                action, (argparse._HelpAction, argparse._SubParsersAction)
            ):
                continue
            option = (action.option_strings or [action.dest])[0]
            assert action.help and action.help.strip(), f"{name} {option}: no help text"
            if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
                continue  # nothing to show, or a flag: its default is its absence
            shown = str(action.default)
            assert (
                f"default: {shown}" in flat
                or f"default {shown}" in flat
                or (f"(default: {shown})" in flat)
            ), f"{name} {option}: default {shown!r} not shown"


@pytest.mark.parametrize("benchmark", ["step", "memory"])
def test_bench_step_and_memory_describe_themselves_and_hide_worker_flags(benchmark, capsys):
    text = help_of("bench", benchmark, capsys=capsys)
    expected = {"step": "ZO-SGD step time", "memory": "peak memory of an estimator's step"}
    assert expected[benchmark] in text
    assert "--mode" not in text  # the memory worker's flag
    assert "--layers" in text


def test_overrides_may_come_before_and_after_config(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "train.steps=2", "--config", SMOKE, f"train.out={out}"]
    assert main([*argv, "train.progress=false", "train.eval_before=false"]) == 0
    saved = load_config(out / "config.yaml")
    assert (saved.train.steps, saved.train.progress) == (2, False)


def test_model_dtype_aliases_are_stored_by_their_full_name():
    for alias, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        assert load_config(SMOKE, [f"model.dtype={alias}"]).model.dtype == name
    with pytest.raises(zo.config.ConfigError, match="model.dtype 'half'"):
        load_config(SMOKE, ["model.dtype=half"])


def test_an_override_adds_to_a_mapping_keyed_by_numbers():
    data = {"task": {"name": "sentiment", "verbalizer": {0: " bad", 1: " good"}}}
    changed = apply_overrides(data, ["task.verbalizer.1= great", "task.verbalizer.2= fine"])
    assert changed["task"]["verbalizer"] == {0: " bad", 1: "great", 2: "fine"}
    assert data["task"]["verbalizer"] == {0: " bad", 1: " good"}  # the input is not changed
    named = apply_overrides({"a": {"x": 1}}, ["a.y=2", "a.3=z"])
    assert named == {"a": {"x": 1, "y": 2, "3": "z"}}  # string keys stay strings


def test_a_verbalizer_override_adds_to_a_builtin_tasks_own_words(tmp_path, capsys):
    from zo.config import ConfigError
    from zo.train import build_task

    def words(*overrides: str) -> list[str]:
        task = build_task(load_config(SMOKE, list(overrides)))
        return task.candidates(task.load("dev")[0])

    assert words() == [" terrible", " great"]  # sentiment's own (smoke.yaml names none)
    assert words('task.verbalizer.2=" okay"') == [" terrible", " great", " okay"]
    assert words('task.verbalizer.1=" good"') == [" terrible", " good"]
    with pytest.raises(ConfigError, match=r"verbalizer key 'x' is not a label.*task.verbalizer.2="):
        words('task.verbalizer.x=" no"')
    argv = ["train", "--config", SMOKE, f"train.out={tmp_path / 'run'}", 'task.verbalizer.x=" no"']
    assert main(argv) == 2
    assert "verbalizer key 'x' is not a label" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_files_honour_the_umask(tmp_path):
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        argv = ["train", "--config", SMOKE, f"train.out={out}", "train.steps=2"]
        assert main([*argv, "train.progress=false", "train.eval_before=false"]) == 0
    finally:
        os.umask(previous)
    files = [
        out / "config.yaml",
        out / "trajectory.jsonl",
        out / "metrics.jsonl",
        out / "summary.json",
        *sorted((out / "checkpoint").iterdir()),
    ]
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert "checkpoint/trainable.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o644)


def test_forward_grad_accepts_eps_and_warns_once():
    from estimators.forward_grad import ForwardGrad

    def steps(**settings) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        inputs = torch.arange(8.0).reshape(2, 4)
        optimizer = ForwardGrad(model.parameters(), lr=0.01, seed=3, **settings)
        for _ in range(2):
            optimizer.step(lambda: model(inputs).pow(2).mean())
        return model.weight.detach().clone()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_eps = steps(eps=1e-3)
    assert [str(w.message) for w in caught if "ignores eps" in str(w.message)] != []
    assert len([w for w in caught if "ignores eps" in str(w.message)]) == 1
    assert torch.equal(with_eps, steps())


def test_experiment_scripts_use_the_installed_public_api():
    for script in sorted((ROOT / "experiments").glob("*.py")):
        tree = ast.parse(script.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path":
                value = node.value
                assert not (isinstance(value, ast.Name) and value.id == "sys"), (
                    f"{script.name}:{node.lineno}: edits sys.path"
                )
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                "zo",
                "estimators",
                "tasks",
            ):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{script.name}:{node.lineno}: imports private {private}"


def test_the_distribution_is_zo_llm_with_the_extras_the_readme_installs():
    import importlib.metadata

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "zo-llm"  # `zo` on PyPI is an unrelated package
    assert project["scripts"] == {"zo": "zo.cli:main"}
    assert importlib.metadata.version("zo-llm") == zo.__version__  # the one version number
    readme = (ROOT / "README.md").read_text()
    for extra, package in (("quant", "bitsandbytes"), ("lora", "peft"), ("tensorboard", "")):
        assert any(dep.startswith(package) for dep in project["optional-dependencies"][extra])
        assert f"pip install 'zo-llm[{extra}]'" in readme
