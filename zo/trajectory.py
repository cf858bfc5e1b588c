"""trajectory.jsonl: the seeds-and-scalars log of a run, and how it is verified.

A header (model hash, trainable manifest, estimator, engine and torch versions), then one
record per step. Format 2 chains a checksum through the header and every record, so a
changed byte, a dropped, repeated or moved line, or a line from another run breaks the
chain at that line; format 1 (no checksums) is still read, with the checks it allows
(header, step sequence, count). An incomplete last line is what a kill leaves, not damage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zo.checkpoint import Checkpoint, CheckpointState
from zo.run_files import (
    JsonLine,
    RunDamagedError,
    atomic_write_text,
    chained_check,
    read_jsonl,
    save_tensors_atomic,
    scan_jsonl,
)

__all__ = [  # the file helpers and Checkpoint are re-exported for older imports
    "TRAJECTORY_FORMAT",
    "Checkpoint",
    "NothingToResumeError",
    "ReplayError",
    "RunDamagedError",
    "RunExistsError",
    "Trajectory",
    "atomic_write_text",
    "checkpoint_fits",
    "header_mismatch",
    "read_jsonl",
    "read_trajectory",
    "save_tensors_atomic",
]

TRAJECTORY_FORMAT = 2
"""1: header and step records; 2: each line carries a ``check`` chained to the one before."""
CHECKED_HEADER_FIELDS = (
    "model",
    "model_hash",
    "trainable",
    "estimator",
    "run_seed",
    "engine_version",
    "generator",
)
"""A resumed or replayed run must agree with its header on these; device and torch version
may differ (the result may then not be bit-identical: said once in the log)."""


class RunExistsError(ValueError):
    pass


class ReplayError(ValueError):
    """A run cannot be replayed as asked (another base model, a gradient-based estimator)."""


class NothingToResumeError(ValueError):
    pass


# ---------------------------------------------------------------------- trajectory


@dataclass
class Trajectory:
    """trajectory.jsonl read and verified up to its first damaged line."""

    path: Path
    header: dict[str, Any] | None
    header_line: str | None
    steps: list[JsonLine] = field(default_factory=list)
    """The intact step records, in order: ``steps[i]`` is step ``i``."""
    checks: list[str | None] = field(default_factory=list)
    """``checks[n]``: the chained checksum after the header and ``n`` records."""
    damage: str | None = None
    """``FILE line N: problem`` at the first damaged line; None when the file is intact."""
    cut_tail: bool = False

    @property
    def format(self) -> int:
        return self.header.get("format", 1) if self.header else TRAJECTORY_FORMAT

    def records(self) -> list[dict[str, Any]]:
        """The step records without their bookkeeping (``type``, ``check``)."""
        return [
            {k: v for k, v in line.record.items() if k not in ("type", "check")}
            for line in self.steps
        ]


def read_trajectory(path: Path) -> Trajectory:
    scan = scan_jsonl(path)
    lines = scan.lines
    if not lines:
        problem = scan.damage or f"{path} line 1: there is no header (the file is empty)"
        return Trajectory(path, None, None, damage=problem, cut_tail=scan.cut_tail)
    first = lines[0]
    if first.record.get("type") != "header":
        return Trajectory(path, None, None, damage=f"{path} line 1: the header is missing")
    header = first.record
    version = header.get("format", 1)
    if not isinstance(version, int) or version > TRAJECTORY_FORMAT:
        raise RunDamagedError(
            f"{path} is of trajectory format {version!r}; this zo reads formats up to "
            f"{TRAJECTORY_FORMAT}: update zo to resume or replay it"
        )
    trajectory = Trajectory(path, header, first.text, cut_tail=scan.cut_tail)
    check = _verify_check(trajectory, first, "") if version >= 2 else None
    if trajectory.damage:
        trajectory.header, trajectory.header_line = None, None
        return trajectory
    trajectory.checks.append(check)
    for line in lines[1:]:
        record = line.record
        expected = len(trajectory.steps)
        if record.get("type") != "step" or not isinstance(record.get("step"), int):
            trajectory.damage = f"{path} line {line.number}: not a step record (garbled)"
            break
        if record["step"] != expected:
            trajectory.damage = f"{path} line {line.number}: " + (
                f"step {record['step']} again (a duplicate record)"
                if record["step"] < expected
                else f"step {record['step']} where step {expected} belongs (steps "
                f"{expected}..{record['step'] - 1} are missing)"
            )
            break
        if version >= 2:
            check = _verify_check(trajectory, line, check)
            if trajectory.damage:
                break
        trajectory.steps.append(line)
        trajectory.checks.append(check)
    if not trajectory.damage and scan.damage:
        trajectory.damage = scan.damage
    return trajectory


def _verify_check(trajectory: Trajectory, line: JsonLine, previous: str) -> str | None:
    body = {k: v for k, v in line.record.items() if k != "check"}
    expected = chained_check(previous, body)
    if line.record.get("check") != expected:
        trajectory.damage = (
            f"{trajectory.path} line {line.number}: checksum mismatch (the line was changed, "
            "or does not follow the line before it)"
        )
    return expected


def header_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first checked field on which a run's header and this setup disagree."""
    for key in CHECKED_HEADER_FIELDS:
        if key not in saved or key not in current:
            continue
        ours, theirs = saved[key], current[key]
        if key == "estimator":  # settings added since the run started are not a change
            common = set(ours) & set(theirs)
            ours = {k: v for k, v in ours.items() if k in common}
            theirs = {k: v for k, v in theirs.items() if k in common}
        if ours != theirs:
            return f"{key} is {_short(ours)} in the run's header, {_short(theirs)} here"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def checkpoint_fits(
    state: CheckpointState, trajectory: Trajectory, records_per_step: bool
) -> str | None:
    """Why a checkpoint does not belong to the trajectory's intact records (None: it does).

    ``records_per_step``: the estimator logs a record per step (every zeroth-order one), so
    a checkpoint of an older zo (no trajectory mark) at step S needs S records."""
    if trajectory.header is None:
        return f"{trajectory.path} has no usable header"
    needed = records_covered(state, records_per_step)
    if needed > len(trajectory.steps):
        return (
            f"it is at step {state.step} but {trajectory.path} holds only "
            f"{len(trajectory.steps)} intact step records"
        )
    mark = state.mark.check if state.mark else None
    if mark is not None and trajectory.format >= 2 and trajectory.checks[needed] != mark:
        return (
            f"its trajectory checksum does not match {trajectory.path} at record {needed} "
            "(the checkpoint belongs to another history of this run)"
        )
    return None


def records_covered(state: CheckpointState, records_per_step: bool) -> int:
    """The trajectory records a checkpoint's weights include."""
    if state.mark is not None:
        return state.mark.records
    return state.step if records_per_step else 0
