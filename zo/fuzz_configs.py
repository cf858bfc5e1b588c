"""Bad configs for :mod:`zo.fuzz`: wrong types, unknown keys, NaN, infinite and negative
numbers, bad devices and paths, broken overrides, and files that are no config at all.

Each generator takes a seeded ``random.Random`` and the case's folder and returns a
:class:`BadConfig`: the file's bytes, overrides, and the words an error must name.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

REFERENCE_CONFIG = {
    "model": {"name": "tiny-llama"},
    "task": {"name": "sentiment", "max_length": 64, "eval_limit": 8},
    "trainable": "full",
    "estimator": {"name": "zo_sgd", "lr": 1.0e-3, "eps": 1.0e-3},
    "train": {
        "steps": 4,
        "batch_size": 4,
        "seed": 0,
        "save_every": 2,
        "log_every": 1,
        "eval_batch_size": 8,
        "eval_before": False,
        "progress": False,
    },
}
"""A tiny run of seconds: the run every damaged case starts from a copy of."""

OUT = "run"  # a case's run directory: a copy of the reference run, or none yet

_KINDS = {
    "model.name": "str",
    "model.dtype": "choice",
    "model.device": "str",
    "task.name": "str",
    "task.max_length": "int",
    "task.eval_limit": "int",
    "task.train_limit": "int",
    "task.template": "str",
    "task.verbalizer": "mapping",
    "task.objective": "choice",
    "trainable.kind": "choice",
    "estimator.lr": "float",
    "estimator.eps": "float",
    "train.steps": "int",
    "train.batch_size": "int",
    "train.grad_accum": "int",
    "train.seed": "int",
    "train.save_every": "int",
    "train.eval_every": "int",
    "train.log_every": "int",
    "train.eval_batch_size": "int",
    "train.keep_checkpoints": "int",
    "train.out": "str",
    "train.lr_schedule": "choice",
    "train.autocast": "choice",
    "train.on_nonfinite": "choice",
    "train.eval_before": "bool",
    "train.repair": "bool",
    "task.calibrate": "bool",
}
_WRONG_TYPES = {
    "str": [12, 1.5, True, [1, 2], {"a": 1}],
    "choice": [3, "bogus", [1], {"a": 1}, True],
    "int": ["abc", 2.5, True, [4], {"a": 1}, "4"],
    "float": ["abc", True, [1e-3], {"a": 1}, None],
    "bool": ["yes please", 3, [True], "true", 0.5],
    "mapping": [3, "great", [" bad", " good"], True],
}
_OUT_OF_RANGE = {
    "estimator.lr": [float("nan"), float("inf"), float("-inf"), -1e-3, 0.0, "nan", "1e999"],
    "estimator.eps": [float("nan"), float("inf"), -1e-3, 0.0, "-inf"],
    "train.steps": [0, -1, -(2**40)],
    "train.batch_size": [0, -4, 100_000_000],
    "train.grad_accum": [0, -2],
    "train.eval_batch_size": [0, -1],
    "train.log_every": [0, -3],
    "train.keep_checkpoints": [0, -1],
    "train.save_every": [-1],
    "train.eval_every": [-5],
    "task.max_length": [0, -1, 3],
    "task.train_limit": [0, -1, -3],
    "task.eval_limit": [0, -1],
}
_BAD_DEVICES = ["tpu9", "cuda:x", "", "gpu", "cuda:99", "cpu cpu", "cuda:-1", "meta", "xla"]


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))


def _set(data: dict, key: str, value: object) -> None:
    *sections, last = key.split(".")
    node = data
    for section in sections:
        if not isinstance(node.get(section), dict):
            node[section] = {}
        node = node[section]
    node[last] = value


def _override(key: str, value: object) -> str:
    """``key=value`` as the command line gives it (the value as YAML text)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _reference_data(out: Path) -> dict:
    data = json.loads(json.dumps(REFERENCE_CONFIG))
    data["train"]["out"] = str(out)
    return data


@dataclass
class BadConfig:
    """A config file's bytes, overrides, and the words an error must name (one of)."""

    what: str
    text: bytes
    overrides: list[str]
    names: tuple[str, ...]
    train_only: bool = False
    """A setting only training reads (where it writes, the batch against the data)."""


def _bad_setting(rng: random.Random, folder: Path, key: str, value: object, what: str) -> BadConfig:
    data = _reference_data(folder / OUT)
    names = (key, key.split(".")[-1])
    train_only = key in ("train.out", "train.batch_size")
    if rng.random() < 0.5:
        what, overrides = f"{what} {key}={value!r} (override)", [_override(key, value)]
    else:
        what, overrides = f"{what} {key}={value!r}", []
        _set(data, key, value)
    return BadConfig(what, yaml_bytes(data), overrides, names, train_only)


def yaml_bytes(data: object) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _wrong_type(rng: random.Random, folder: Path) -> BadConfig:
    key = rng.choice(sorted(_KINDS))
    return _bad_setting(rng, folder, key, rng.choice(_WRONG_TYPES[_KINDS[key]]), "wrong type")


def _out_of_range(rng: random.Random, folder: Path) -> BadConfig:
    key = rng.choice(sorted(_OUT_OF_RANGE))
    return _bad_setting(rng, folder, key, rng.choice(_OUT_OF_RANGE[key]), "out of range")


def _bad_device(rng: random.Random, folder: Path) -> BadConfig:
    return _bad_setting(rng, folder, "model.device", rng.choice(_BAD_DEVICES), "bad device")


def _unknown_key(rng: random.Random, folder: Path) -> BadConfig:
    section = rng.choice(["", "model.", "task.", "trainable.", "estimator.", "engine.", "train."])
    key = section + word(rng)
    return _bad_setting(rng, folder, key, rng.choice([1, "x", True, None, [1]]), "unknown key")


def _missing_name(rng: random.Random, folder: Path) -> BadConfig:
    data = _reference_data(folder / OUT)
    key = rng.choice(["model", "task", "model.name", "task.name", "estimator.name"])
    section, _, name = key.partition(".")
    if name:
        del data[section][name]
    else:
        del data[section]
    return BadConfig(f"missing {key}", yaml_bytes(data), [], (f"{section}.name",))


def _bad_path(rng: random.Random, folder: Path) -> BadConfig:
    afile = folder / "a-file"
    afile.write_text("not a directory\n")
    missing = folder / "missing" / word(rng)
    key, value = rng.choice(
        [
            ("train.out", str(afile)),
            ("train.out", str(afile / "run")),
            ("train.out", ""),
            ("train.out", "  "),
            ("trainable", f"mask:{missing}.safetensors"),
            ("model.name", str(missing)),
            ("task.data_dir", str(missing)),
            ("task.data_dir", str(afile)),
        ]
    )
    bad = _bad_setting(rng, folder, key, value, "bad path")
    names = (value.strip(), key) if value.strip() else (key,)
    return BadConfig(bad.what, bad.text, bad.overrides, (*names, str(missing)), bad.train_only)


def _bad_file(rng: random.Random, folder: Path) -> BadConfig:
    """The whole file is wrong: the message names the file."""
    text = yaml_bytes(_reference_data(folder / OUT))
    kind = rng.choice(
        ["random bytes", "empty", "not UTF-8", "a list", "a scalar", "bad YAML", "deep", "cut"]
    )
    if kind == "random bytes":
        text = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    elif kind == "empty":
        text = rng.choice([b"", b"\n", b"# only a comment\n", b"---\n"])
    elif kind == "not UTF-8":
        at = rng.randrange(len(text))
        text = text[:at] + bytes([rng.randrange(0x80, 0x100)]) + b"\xff" + text[at:]
    elif kind == "a list":
        text = b"- model\n- task\n"
    elif kind == "a scalar":
        text = rng.choice([b"42\n", b"hello\n", b"null\n", b"3.5\n"])
    elif kind == "bad YAML":  # at the start of a line, where each of these is an error
        at = rng.choice([0, *(i + 1 for i, byte in enumerate(text[:-1]) if byte == ord("\n"))])
        text = text[:at] + rng.choice([b": : [", b"\t- {", b"]]]", b"&a *b", b"}"]) + text[at:]
    elif kind == "deep":
        text = b"model: " + b"[" * 20000 + b"\n"
    else:  # cut before the task section: valid YAML that names no task
        text = text[: rng.randrange(1, text.index(b"task:"))]
    return BadConfig(f"config file: {kind}", text, [], ())  # names: the file, set by the case


def _bad_override(rng: random.Random, folder: Path) -> BadConfig:
    override = rng.choice(
        [
            "train.steps",
            "=3",
            "train..steps=3",
            "train.steps.x=3",
            ".steps=1",
            "model=3",
            "task=[1]",
        ]
    )
    return BadConfig(
        f"bad override {override!r}",
        yaml_bytes(_reference_data(folder / OUT)),
        [override],
        (override, "model", "task"),
    )


CONFIG_DAMAGE = {
    "wrong type": _wrong_type,
    "out of range": _out_of_range,
    "bad device": _bad_device,
    "unknown key": _unknown_key,
    "missing name": _missing_name,
    "bad path": _bad_path,
    "bad file": _bad_file,
    "bad override": _bad_override,
}
