"""Seeded bad input for the ``zo`` command: broken configs and damaged run directories.

A :class:`Case` is one ``zo`` command line against a generated config file or a damaged
copy of a reference run, with what the command must do about it: exit with the documented
code (2: a usage error), name the file or key at fault, let no exception escape (no
traceback), and change no byte of a run it refused or only read. :func:`cases` generates
them from a seed (the same seed gives the same cases, so a failure is reproduced by its
seed); :func:`check` runs one in this process and returns what went wrong (nothing: an
empty list); :func:`check_subprocess` runs one through the ``zo`` console entry point.

Used by ``tests/test_fuzz.py`` (the default suite) and ``experiments/reliability.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
import string
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
TRACEBACK = "Traceback (most recent call last)"
LOCK = ".lock"  # the run lock's file holds its last owner's pid: not the run's content


def write_reference(folder: Path) -> tuple[Path, Path]:
    """Train the reference run into ``folder / "run"``; returns (its config file, the run)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "reference.yaml"
    config.write_text(yaml.safe_dump(REFERENCE_CONFIG, sort_keys=False))
    run = folder / "run"
    code, _, err = call_zo(["train", "--config", str(config), f"train.out={run}"])
    if code != 0:
        raise RuntimeError(f"the reference run failed (exit {code}): {err}")
    return config, run


# ---------------------------------------------------------------------- running zo


def call_zo(argv: list[str]) -> tuple[int | str, str, str]:
    """``zo.cli.main(argv)`` in this process: (exit code, or the escaped exception's
    type and message; stdout; stderr)."""
    from zo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: int | str = main(argv)
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as error:  # noqa: BLE001 -- the escaped exception is the finding
            code = f"{TRACEBACK}: {type(error).__name__}: {error}"
    return code, out.getvalue(), err.getvalue()


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the lock file aside), by relative path;
    folders are listed too, so a new empty one counts as a change."""
    if not folder.exists():
        return {}
    digest = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.name == LOCK:
            continue
        digest[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "/"
    return digest


# ---------------------------------------------------------------------- cases


@dataclass
class Case:
    """One command against one broken input, and what it must do."""

    name: str
    argv: list[str]
    expected: frozenset[int] = frozenset({2})
    names: tuple[str | tuple[str, ...], ...] = ()
    """With exit code 2, stderr names one of these (a file, a key, a value; a tuple: all
    of its parts, such as a run directory and a file name)."""
    guarded: Path | None = None
    """A directory no byte of which may change (a run refused or only read); a directory
    that did not exist must not be created."""
    prepare: Callable[[], str] = field(default=lambda: "", repr=False)
    """Writes the broken input (the config file, the damaged run copy); returns what it
    did to it, to add to the case's name."""


@dataclass
class Outcome:
    case: Case
    code: int | str
    stderr: str
    problems: list[str]


def check(case: Case) -> Outcome:
    """Run ``case`` in this process; the problems found (none: it did what it must)."""
    _prepare(case)
    before = tree_digest(case.guarded) if case.guarded else None
    code, _, err = call_zo(case.argv)
    return Outcome(case, code, err, _judge(case, code, err, before))


def check_subprocess(case: Case, cwd: Path | None = None) -> Outcome:
    """Run ``case`` through ``python -m zo.cli``: what reaches the terminal, tracebacks
    included."""
    _prepare(case)
    before = tree_digest(case.guarded) if case.guarded else None
    done = subprocess.run(
        [sys.executable, "-m", "zo.cli", *case.argv], capture_output=True, text=True, cwd=cwd
    )
    return Outcome(
        case, done.returncode, done.stderr, _judge(case, done.returncode, done.stderr, before)
    )


def _prepare(case: Case) -> None:
    done = case.prepare()
    if done:
        case.name = f"{case.name} {done}"


def _names(err: str, name: str | tuple[str, ...]) -> bool:
    return name in err if isinstance(name, str) else all(part in err for part in name)


def _judge(case: Case, code: int | str, err: str, before: dict[str, str] | None) -> list[str]:
    problems = []
    if isinstance(code, str) or TRACEBACK in err:
        problems.append(f"traceback: {code if isinstance(code, str) else err.strip()[-600:]}")
    elif code not in case.expected:
        problems.append(f"exit code {code}, expected {sorted(case.expected)}: {err.strip()[-600:]}")
    elif code == 2 and case.names and not any(_names(err, name) for name in case.names):
        problems.append(f"the message names none of {list(case.names)}: {err.strip()[-600:]}")
    if before is not None and case.guarded is not None:
        after = tree_digest(case.guarded)
        if after != before:
            changed = sorted(
                k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
            )
            problems.append(f"changed in {case.guarded}: {changed[:5]}")
    return problems


# ---------------------------------------------------------------------- bad configs

_KINDS = {
    "model.name": "str",
    "model.dtype": "choice",
    "model.device": "str",
    "task.name": "str",
    "task.max_length": "int",
    "task.eval_limit": "int",
    "task.train_limit": "int",
    "task.template": "str",
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


def _word(rng: random.Random) -> str:
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
class _BadConfig:
    """A config file's bytes, overrides, and the words an error must name (one of)."""

    what: str
    text: bytes
    overrides: list[str]
    names: tuple[str, ...]
    train_only: bool = False
    """A setting only training reads (where it writes, the batch against the data)."""


def _bad_setting(
    rng: random.Random, folder: Path, key: str, value: object, what: str
) -> _BadConfig:
    data = _reference_data(folder / OUT)
    names = (key, key.split(".")[-1])
    train_only = key in ("train.out", "train.batch_size")
    if rng.random() < 0.5:
        what, overrides = f"{what} {key}={value!r} (override)", [_override(key, value)]
    else:
        what, overrides = f"{what} {key}={value!r}", []
        _set(data, key, value)
    return _BadConfig(what, _yaml(data), overrides, names, train_only)


def _yaml(data: object) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _wrong_type(rng: random.Random, folder: Path) -> _BadConfig:
    key = rng.choice(sorted(_KINDS))
    return _bad_setting(rng, folder, key, rng.choice(_WRONG_TYPES[_KINDS[key]]), "wrong type")


def _out_of_range(rng: random.Random, folder: Path) -> _BadConfig:
    key = rng.choice(sorted(_OUT_OF_RANGE))
    return _bad_setting(rng, folder, key, rng.choice(_OUT_OF_RANGE[key]), "out of range")


def _bad_device(rng: random.Random, folder: Path) -> _BadConfig:
    return _bad_setting(rng, folder, "model.device", rng.choice(_BAD_DEVICES), "bad device")


def _unknown_key(rng: random.Random, folder: Path) -> _BadConfig:
    section = rng.choice(["", "model.", "task.", "trainable.", "estimator.", "engine.", "train."])
    key = section + _word(rng)
    return _bad_setting(rng, folder, key, rng.choice([1, "x", True, None, [1]]), "unknown key")


def _missing_name(rng: random.Random, folder: Path) -> _BadConfig:
    data = _reference_data(folder / OUT)
    key = rng.choice(["model", "task", "model.name", "task.name", "estimator.name"])
    section, _, name = key.partition(".")
    if name:
        del data[section][name]
    else:
        del data[section]
    return _BadConfig(f"missing {key}", _yaml(data), [], (f"{section}.name",))


def _bad_path(rng: random.Random, folder: Path) -> _BadConfig:
    afile = folder / "a-file"
    afile.write_text("not a directory\n")
    missing = folder / "missing" / _word(rng)
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
    return _BadConfig(bad.what, bad.text, bad.overrides, (*names, str(missing)), bad.train_only)


def _bad_file(rng: random.Random, folder: Path) -> _BadConfig:
    """The whole file is wrong: the message names the file."""
    text = _yaml(_reference_data(folder / OUT))
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
    return _BadConfig(f"config file: {kind}", text, [], ())  # names: the file, set by the case


def _bad_override(rng: random.Random, folder: Path) -> _BadConfig:
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
    return _BadConfig(
        f"bad override {override!r}",
        _yaml(_reference_data(folder / OUT)),
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


# ---------------------------------------------------------------------- damaged runs

_WHITESPACE = b" \t\r\n"


def _flip(rng: random.Random, raw: bytes) -> bytes:
    """One byte changed so that the file means something else: never a change of letter
    case or into whitespace, which JSON and YAML may read as the same content."""
    at = rng.randrange(len(raw))
    while True:
        changed = raw[at] ^ rng.randrange(1, 256)
        if changed ^ raw[at] != 0x20 and changed not in _WHITESPACE:
            return raw[:at] + bytes([changed]) + raw[at + 1 :]


def _garble(rng: random.Random, raw: bytes) -> bytes:
    at = rng.randrange(len(raw))
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return raw[:at] + junk + raw[at + len(junk) :] if junk != raw[at : at + len(junk)] else raw[:-1]


def _byte_damage(rng: random.Random, path: Path) -> str:
    raw = path.read_bytes()
    kind = rng.choice(["truncated", "emptied", "flipped", "garbled", "deleted", "random bytes"])
    if kind == "deleted":
        path.unlink()
    elif kind == "emptied":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(raw[: rng.randrange(1, len(raw))])
    elif kind == "flipped":
        path.write_bytes(_flip(rng, raw))
    elif kind == "garbled":
        path.write_bytes(_garble(rng, raw))
    else:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000))))
    return kind


def _line_damage(rng: random.Random, path: Path) -> str:
    """A trajectory or metrics line garbled, dropped, repeated, swapped or not UTF-8."""
    lines = path.read_bytes().splitlines(keepends=True)
    n = rng.randrange(len(lines))
    kind = rng.choice(["garbled", "not JSON", "not UTF-8", "dropped", "repeated", "swapped"])
    if kind == "garbled":
        lines[n] = _garble(rng, lines[n].rstrip(b"\n")).replace(b"\n", b"") + b"\n"
    elif kind == "not JSON":
        lines[n] = rng.choice([b"{}\n", b"[1, 2]\n", b"null\n", b'{"type": "step"}\n', b"\n"])
    elif kind == "not UTF-8":
        lines[n] = lines[n][:5] + b"\xff\xfe" + lines[n][5:]
    elif kind == "dropped":
        del lines[n]
    elif kind == "repeated":
        lines.insert(n, lines[n])
    else:
        m = n + 1 if n + 1 < len(lines) else n - 1
        lines[n], lines[m] = lines[m], lines[n]
    path.write_bytes(b"".join(lines))
    return f"line {n + 1} {kind}"


def _config_damage(rng: random.Random, path: Path) -> str:
    """config.yaml made unreadable or invalid (it has no checksum: a change that stays a
    valid config of the same run is not damage zo can see)."""
    raw = path.read_bytes()
    kind = rng.choice(
        [
            "deleted",
            "emptied",
            "random bytes",
            "not UTF-8",
            "bad YAML",
            "unknown key",
            "wrong type",
            "no model",
        ]
    )
    data = yaml.safe_load(raw)
    if kind == "deleted":
        path.unlink()
        return kind
    if kind == "emptied":
        raw = b""
    elif kind == "random bytes":
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    elif kind == "not UTF-8":
        at = rng.randrange(len(raw))
        raw = raw[:at] + b"\xc3\x28" + raw[at:]
    elif kind == "bad YAML":
        raw = b"]]]\n" + raw
    elif kind == "unknown key":
        data["train"][_word(rng)] = 1
        raw = _yaml(data)
    elif kind == "wrong type":
        data["train"]["steps"] = rng.choice(["four", [4], 4.5])
        raw = _yaml(data)
    else:
        del data[rng.choice(["model", "task"])]
        raw = _yaml(data)
    path.write_bytes(raw)
    return kind


def _extra_folder(rng: random.Random, run: Path) -> str:
    """A stray checkpoint folder beside the newest (never newer than it: ``checkpoint/``
    is the newest by definition)."""
    folder = run / f"checkpoint-{rng.randrange(100)}"
    kind = rng.choice(
        ["empty folder", "garbage state.json", "a file", "a copy", "leftover staging"]
    )
    if kind == "empty folder":
        folder.mkdir()
    elif kind == "garbage state.json":
        folder.mkdir()
        (folder / "state.json").write_bytes(bytes(rng.randrange(256) for _ in range(64)))
    elif kind == "a file":
        folder.write_bytes(b"not a folder")
    elif kind == "a copy":
        shutil.copytree(run / "checkpoint", folder)
    else:
        folder = run / "checkpoint.tmp"
        folder.mkdir()
        (folder / "state.json").write_text("{")
    return f"{kind} {folder.name}"


# damaged file -> how it is damaged, and the exit codes of resume, replay, eval RUN and
# eval --checkpoint (a tuple of allowed codes: a damaged step line does not stop an
# evaluation of the checkpoint, which verifies by its own checksums)
RUN_DAMAGE: dict[str, tuple[Callable[[random.Random, Path], str], tuple[frozenset[int], ...]]] = {
    "trajectory.jsonl": (
        lambda rng, p: (_line_damage if rng.random() < 0.6 else _byte_damage)(rng, p),
        (frozenset({2}), frozenset({2}), frozenset({0, 2}), frozenset({0, 2})),
    ),
    "metrics.jsonl": (
        lambda rng, p: _metrics_damage(rng, p),
        (frozenset({2}), frozenset({0}), frozenset({0}), frozenset({0})),
    ),
    "config.yaml": (
        _config_damage,
        (frozenset({2}), frozenset({2}), frozenset({2}), frozenset({0})),
    ),
    "checkpoint/state.json": (_byte_damage, (frozenset({2}),) * 4),
    "checkpoint/trainable.safetensors": (_byte_damage, (frozenset({2}),) * 4),
    "checkpoint/optimizer.pt": (
        _byte_damage,
        (frozenset({2}), frozenset({0}), frozenset({0}), frozenset({0})),
    ),
}
EXTRA_FOLDER_CODES = (frozenset({0}),) * 4


def _metrics_damage(rng: random.Random, path: Path) -> str:
    """A metrics line that is not JSON (no checksums here: a changed number is a log's
    business, not damage to the weights)."""
    lines = path.read_bytes().splitlines(keepends=True)
    n = rng.randrange(len(lines))
    kind = rng.choice(["garbled", "not UTF-8"])
    lines[n] = b"{garbled\n" if kind == "garbled" else lines[n][:3] + b"\xff" + lines[n][3:]
    path.write_bytes(b"".join(lines))
    return f"line {n + 1} {kind}"


# ---------------------------------------------------------------------- the cases

COMMANDS = ("train", "resume", "replay", "eval RUN", "eval --checkpoint")


def _argv(command: str, config: Path, run: Path, folder: Path, overrides: list[str]) -> list[str]:
    """The command line; overrides come last, where they win over the case's own."""
    if command == "train":
        return ["train", "--config", str(config), *overrides]
    if command == "resume":
        resume = [f"train.out={run}", "resume=true", "train.steps=6"]
        return ["train", "--config", str(config), *resume, *overrides]
    if command == "replay":
        return ["replay", str(run), "--out", str(folder / "replayed")]
    if command == "eval RUN":
        return ["eval", str(run), *overrides]
    return ["eval", "--config", str(config), "--checkpoint", str(run / "checkpoint"), *overrides]


def _copy_run(reference: Path, run: Path) -> None:
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns(LOCK))


def config_case(rng: random.Random, folder: Path, reference: Path, damage: str) -> Case:
    """A bad config (``damage``: a key of :data:`CONFIG_DAMAGE`) for a new run (``train``),
    a resume of the reference run, or an evaluation of its checkpoint."""
    folder.mkdir(parents=True)
    bad = CONFIG_DAMAGE[damage](rng, folder)
    commands = ["train", "train", "resume", *([] if bad.train_only else ["eval --checkpoint"])]
    command = rng.choice(commands)
    config, run = folder / "config.yaml", folder / OUT
    # the file's train.out is the run (a bad one in the file or an override must win)
    argv = _argv(command, config, run, folder, bad.overrides)
    if command == "resume":
        argv = ["train", "--config", str(config), "resume=true", *bad.overrides]

    def prepare() -> str:
        config.write_bytes(bad.text)
        if command != "train":
            _copy_run(reference, run)
        return ""

    return Case(
        f"{command}: {damage}: {bad.what}",
        argv,
        names=bad.names or (str(config),),
        guarded=run,
        prepare=prepare,
    )


RUN_TARGETS = (*RUN_DAMAGE, "extra folder")


def run_case(rng: random.Random, folder: Path, config: Path, reference: Path, target: str) -> Case:
    """A command on a copy of the reference run with ``target`` (one of
    :data:`RUN_TARGETS`) damaged: a file, or a stray folder beside the checkpoint."""
    folder.mkdir(parents=True)
    run = folder / OUT
    # a resume beside a stray folder continues the run (and rotates checkpoints): readers only
    index = rng.randrange(1 if target in RUN_DAMAGE else 2, len(COMMANDS))
    codes = (RUN_DAMAGE[target][1] if target in RUN_DAMAGE else EXTRA_FOLDER_CODES)[index - 1]
    seed = rng.randrange(2**32)

    def prepare() -> str:
        _copy_run(reference, run)
        damage_rng = random.Random(seed)
        if target in RUN_DAMAGE:
            return RUN_DAMAGE[target][0](damage_rng, run / target)
        return _extra_folder(damage_rng, run)

    return Case(
        f"{COMMANDS[index]}: {target}",
        _argv(COMMANDS[index], config, run, folder, []),
        expected=codes,
        names=(str(run / target), (str(run), Path(target).name)),
        guarded=run,
        prepare=prepare,
    )


def cases(seed: int, work: Path, config: Path, reference: Path, count: int) -> list[Case]:
    """``count`` cases from ``seed``, half bad configs, half damaged runs, each kind of
    damage in turn (in an order drawn from the seed); each case has its own folder under
    ``work`` (made here; ``prepare`` fills it when the case runs)."""
    rng = random.Random(seed)
    config_kinds, run_targets = _rounds(rng, sorted(CONFIG_DAMAGE)), _rounds(rng, RUN_TARGETS)
    made = []
    for number in range(count):
        folder = work / f"case-{number}"
        if number % 2 == 0:
            made.append(config_case(rng, folder, reference, next(config_kinds)))
        else:
            made.append(run_case(rng, folder, config, reference, next(run_targets)))
    return made


def _rounds(rng: random.Random, kinds: Sequence[str]) -> Iterator[str]:
    """Every kind once per round, in a shuffled order."""
    while True:
        order = list(kinds)
        rng.shuffle(order)
        yield from order
