"""Seeded fuzzing of the zo command: generated bad configs and damaged run directories
through ``zo train``, ``train resume=true``, ``zo replay``, ``zo eval RUN`` and ``zo eval
--checkpoint``. Each must exit with its documented code (2 for usage errors) naming the
file or key, let no exception escape, and leave every byte of the run it refused or read
as it was (see :mod:`zo.fuzz`). A failure prints its seed: ``ZO_FUZZ_SEED=N pytest
tests/test_fuzz.py`` runs the same cases again; ``ZO_FUZZ_CASES`` sets how many."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from zo import fuzz

SEED = int(os.environ.get("ZO_FUZZ_SEED", "13"))
COUNT = int(os.environ.get("ZO_FUZZ_CASES", "64"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The reference run (4 steps, a checkpoint at 2 and 4), trained once per module."""
    return fuzz.write_reference(tmp_path_factory.mktemp("fuzz"))


def report(outcomes: list[fuzz.Outcome], seed: int) -> str:
    failed = [o for o in outcomes if o.problems]
    lines = [f"{len(failed)} of {len(outcomes)} cases failed (ZO_FUZZ_SEED={seed}):"]
    lines += [f"- {o.case.name}: {' | '.join(o.problems)}" for o in failed]
    return "\n".join(lines)


def test_generated_bad_input_is_refused_cleanly(reference, tmp_path):
    config, run = reference
    outcomes = [fuzz.check(case) for case in fuzz.cases(SEED, tmp_path, config, run, COUNT)]
    assert not any(o.problems for o in outcomes), report(outcomes, SEED)
    assert sum(o.code == 2 for o in outcomes) > COUNT / 2  # mostly refusals, not reads


def test_the_cases_cover_every_kind_of_damage_and_every_command(reference, tmp_path):
    config, run = reference
    names = [case.name for case in fuzz.cases(SEED, tmp_path, config, run, COUNT)]
    for command in fuzz.COMMANDS:
        assert any(name.startswith(f"{command}: ") for name in names), command
    for kind in fuzz.CONFIG_DAMAGE:
        assert any(f": {kind}" in name for name in names), kind
    for target in fuzz.RUN_TARGETS:
        assert any(f": {target}" in name for name in names), target


def test_the_same_seed_gives_the_same_cases(reference, tmp_path):
    config, run = reference

    def generated(folder: Path) -> list[tuple[str, list[str]]]:
        made = fuzz.cases(SEED, folder, config, run, 16)
        return [
            (c.name.replace(str(folder), "WORK"), [a.replace(str(folder), "WORK") for a in c.argv])
            for c in made
        ]

    first, again = generated(tmp_path / "a"), generated(tmp_path / "b")
    assert first == again
    other = fuzz.cases(SEED + 1, tmp_path / "c", config, run, 16)
    assert [name for name, _ in first] != [case.name for case in other]


def damaged_copy(run: Path, folder: Path, damage) -> Path:
    copy = folder / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(fuzz.LOCK))
    damage(copy)
    return copy


# Bugs the fuzzer found, each pinned as its own case.
def _config(folder: Path, text: str) -> Path:
    path = folder / "bad.yaml"
    path.write_text(text)
    return path


def test_eval_refuses_a_config_without_model_and_task(reference, tmp_path):
    config, run = reference
    for text, named in [("", "is empty"), ("task:\n  name: sentiment\n", "model.name")]:
        bad = _config(tmp_path, text)
        case = fuzz.Case(
            "eval --checkpoint: empty config",
            ["eval", "--config", str(bad), "--checkpoint", str(run)],
            names=((str(bad), named),),
            guarded=run,
        )
        assert not fuzz.check(case).problems


@pytest.mark.parametrize("limit", ["task.eval_limit=-1", "task.train_limit=0"])
def test_example_limits_below_one_are_refused(reference, tmp_path, limit):
    config, _ = reference
    out = tmp_path / "out"
    case = fuzz.Case(limit, ["train", "--config", str(config), f"train.out={out}", limit])
    case.names, case.guarded = (limit.split("=")[0],), out
    assert not fuzz.check(case).problems


@pytest.mark.parametrize("command", ["resume", "replay", "eval RUN"])
def test_a_run_config_missing_a_section_is_refused_by_name(reference, tmp_path, command):
    config, run = reference

    def drop_model(copy: Path) -> None:
        text = (copy / "config.yaml").read_text()
        (copy / "config.yaml").write_text(text[text.index("task:") :])

    copy = damaged_copy(run, tmp_path, drop_model)
    argv = fuzz._argv(command, config, copy, tmp_path, [])
    case = fuzz.Case(command, argv, names=(str(copy / "config.yaml"),), guarded=copy)
    assert not fuzz.check(case).problems


def test_a_run_with_checkpoints_but_no_trajectory_is_not_started_over(reference, tmp_path):
    config, run = reference
    for damage in ("deleted", "emptied"):
        folder = tmp_path / damage
        folder.mkdir()

        def harm(copy: Path, damage=damage) -> None:
            trajectory = copy / "trajectory.jsonl"
            trajectory.unlink() if damage == "deleted" else trajectory.write_bytes(b"")

        copy = damaged_copy(run, folder, harm)
        argv = fuzz._argv("resume", config, copy, folder, [])
        case = fuzz.Case(damage, argv, names=(str(copy / "trajectory.jsonl"),), guarded=copy)
        assert not fuzz.check(case).problems  # it deleted the checkpoint and started over


def test_no_traceback_reaches_the_terminal(reference, tmp_path):
    """Through the real entry point (a fresh interpreter), stderr included."""
    config, run = reference
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(bytes(range(256)))
    copy = damaged_copy(run, tmp_path, lambda c: (c / "checkpoint" / "state.json").unlink())
    cases = [
        fuzz.Case(
            "train: random bytes",
            ["train", "--config", str(garbage), f"train.out={tmp_path / 'new'}"],
            names=(str(garbage),),
            guarded=tmp_path / "new",
        ),
        fuzz.Case(
            "replay: no state.json",
            ["replay", str(copy), "--out", str(tmp_path / "replayed")],
            names=(str(copy / "checkpoint" / "state.json"),),
            guarded=copy,
        ),
    ]
    for case in cases:
        outcome = fuzz.check_subprocess(case)
        assert not outcome.problems, (case.name, outcome.problems)
        assert outcome.stderr.strip().startswith("zo: error: ")


def test_an_override_without_a_value_is_named_beside_a_config(reference, tmp_path):
    config, run = reference
    argv = ["eval", "--config", str(config), "--checkpoint", str(run), "train.steps"]
    case = fuzz.Case("eval: override without =", argv, names=("'train.steps' is neither",))
    assert not fuzz.check(case).problems  # it said "a run directory or --config, not both"


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_replay_refuses_an_out_that_cannot_be_a_directory(reference, tmp_path, where):
    config, run = reference
    out = config if where == "a file" else config / "replayed"
    case = fuzz.Case(where, ["replay", str(run), "--out", str(out)], names=(f"--out {out}",))
    case.guarded = run
    assert not fuzz.check(case).problems  # FileExistsError / NotADirectoryError tracebacks


def test_export_refuses_an_out_under_a_file(reference, tmp_path):
    config, run = reference
    out = config / "export"
    case = fuzz.Case("export", ["export", str(run), "--out", str(out)], names=(f"--out {out}",))
    case.guarded = run
    assert not fuzz.check(case).problems  # a FileExistsError traceback


def test_a_verbalizer_that_is_no_mapping_is_a_task_error(reference, tmp_path):
    config, _ = reference
    out = tmp_path / "out"
    argv = ["train", "--config", str(config), f"train.out={out}", "task.verbalizer=3"]
    case = fuzz.Case("verbalizer", argv, names=("verbalizer",), guarded=out)
    assert not fuzz.check(case).problems  # a TypeError traceback from dict(3)
