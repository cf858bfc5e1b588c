"""Seeded bad input for the ``zo`` command: broken configs and damaged run directories.

A :class:`Case` is one ``zo`` command line against a generated config file or a damaged
copy of a reference run, with what the command must do about it: exit with the documented
code (2: a usage error), name the file or key at fault, let no exception escape (no
traceback), and change no byte of a run it refused or only read. :func:`cases` generates
them from a seed (the same seed gives the same cases, so a failure is reproduced by its
seed); :func:`check` runs one in this process and returns what went wrong (nothing: an
empty list); :func:`check_subprocess` runs one through the ``zo`` console entry point.

The broken inputs come from :mod:`zo.fuzz_configs` and :mod:`zo.fuzz_runs`. Used by
``tests/test_fuzz.py`` (the default suite) and ``experiments/reliability.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zo.fuzz_configs import CONFIG_DAMAGE, OUT, REFERENCE_CONFIG
from zo.fuzz_runs import EXTRA_FOLDER_CODES, RUN_DAMAGE, extra_folder

TRACEBACK = "Traceback (most recent call last)"
LOCK = ".lock"  # the run lock's file holds its last owner's pid: not the run's content


def write_reference_config(folder: Path) -> Path:
    """The reference run's config, as ``folder / "reference.yaml"``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "reference.yaml"
    config.write_text(yaml.safe_dump(REFERENCE_CONFIG, sort_keys=False))
    return config


def write_reference(folder: Path) -> tuple[Path, Path]:
    """Train the reference run into ``folder / "run"``; returns (its config file, the run)."""
    config = write_reference_config(folder)
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
        return extra_folder(damage_rng, run)

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
