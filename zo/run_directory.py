"""The run directory: resolved config, logs, trajectory, checkpoints, and its life cycle.

Every write is atomic (temp file + rename) or an append of whole JSON lines, so a run
killed at any instant (``kill -9`` included) leaves a directory that ``resume`` can
continue: an incomplete last line and the steps past the checkpoint it resumes from are
dropped. Anything else that is wrong (a garbled line, a gap or duplicate in the steps, a
checksum that does not match, a checkpoint that does not verify) is damage: resume refuses
it, naming the file and line, and writes nothing. Only ``train.repair=true`` lets resume
set the damaged part aside (copied or renamed, never deleted) and continue from the intact
part. A damaged checkpoint with an older good one kept (``train.keep_checkpoints``) is
skipped, said in the log, and set aside.

A run exists once its trajectory header is written: config.yaml comes first, so a directory
with config.yaml and no trajectory is a run killed while being created, which ``resume``
starts over. One process owns the directory at a time (:mod:`zo.run_lock`).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zo import checkpoint as checkpoints
from zo.checkpoint import Checkpoint, CheckpointState, CheckpointVanished, TrajectoryMark
from zo.run_files import (
    JsonlScan,
    RunDamagedError,
    atomic_write_text,
    chained_check,
    fsync_path,
    read_jsonl,
    scan_jsonl,
)
from zo.trajectory import (
    TRAJECTORY_FORMAT,
    NothingToResumeError,
    RunExistsError,
    Trajectory,
    checkpoint_fits,
    header_mismatch,
    read_trajectory,
    records_covered,
)

METRICS_FORMAT = 2
"""How metrics.jsonl numbers its lines (:mod:`zo.metrics_log`), recorded in the trajectory
header as ``metrics_format``: 2 counts as the progress bar (0: before any update); a header
without the field (format 1) numbered a line by the index of the update it followed."""

REPAIR_HINT = (
    "pass train.repair=true to resume from the intact part (the damaged file is kept as a "
    "copy next to it), or restore the file"
)


# ---------------------------------------------------------------------- resume plan


@dataclass
class ResumePlan:
    """What a resume will do, decided by reading alone (a refused resume changes nothing)."""

    trajectory: Trajectory | None
    """None: the run was killed while being created; it starts over."""
    metrics: JsonlScan | None = None
    state: CheckpointState | None = None
    """The checkpoint to resume from (verified); None: from step 0."""
    records: int = 0
    """Step records kept (those the checkpoint covers)."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Checkpoints newer than the chosen one that failed verification, with the reason."""

    @property
    def start_step(self) -> int:
        return self.state.step if self.state else 0

    @property
    def damaged(self) -> list[JsonlScan | Trajectory]:
        found = [self.trajectory, self.metrics]
        return [f for f in found if f is not None and f.damage]


# ---------------------------------------------------------------------- run directory


class RunDirectory:
    """Paths and safe writes of one run; knows nothing of models or estimators."""

    def __init__(self, path: str | Path, keep_checkpoints: int = 1):
        self.path = Path(path)
        self.keep_checkpoints = keep_checkpoints
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.trajectory = self.path / "trajectory.jsonl"
        self.checkpoint_dir = self.path / checkpoints.NEWEST
        self.summary = self.path / "summary.json"
        self.plot = self.path / "loss.png"
        self._format = TRAJECTORY_FORMAT
        self.metrics_format = METRICS_FORMAT
        self._records = 0
        self._check: str | None = None

    # ------------------------------------------------------------------ life cycle
    def holds_run(self) -> bool:
        return self.trajectory.exists() or self.config.exists()

    def half_created(self) -> bool:
        """config.yaml but no trajectory header yet: killed while being created (and so
        before any checkpoint: a run with one has lost its trajectory, which is damage)."""
        return (
            self.config.exists()
            and (not self.trajectory.exists() or self.trajectory.stat().st_size == 0)
            and not self.has_checkpoint()
        )

    def ensure_new(self) -> None:
        if self.half_created():
            raise RunExistsError(
                f"run directory {self.path} holds a run that was killed while being created "
                "(config.yaml, no trajectory header); pass resume=true to start it over, or "
                "choose another train.out"
            )
        if self.holds_run():
            raise RunExistsError(
                f"run directory {self.path} already holds a run; pass resume=true to "
                "continue it, or choose another train.out"
            )

    def create(self, config_yaml: str, header: dict[str, Any]) -> None:
        self.ensure_new()
        self._write_initial(config_yaml, header)

    def _write_initial(self, config_yaml: str, header: dict[str, Any]) -> None:
        """config.yaml and metrics.jsonl, then the trajectory header: the run exists once
        the header does."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.metrics, "")
        atomic_write_text(self.config, config_yaml)
        atomic_write_text(self.trajectory, self._header_line(header))
        self._records = 0

    def _header_line(self, header: dict[str, Any]) -> str:
        record = {"type": "header", **header, "metrics_format": METRICS_FORMAT}
        self._format = record.get("format", 1)
        self.metrics_format = METRICS_FORMAT
        self._check = None
        if self._format >= 2:
            self._check = record["check"] = chained_check("", record)
        return json.dumps(record) + "\n"

    def header(self) -> dict[str, Any]:
        trajectory = read_trajectory(self.trajectory) if self.trajectory.exists() else None
        if trajectory is None or trajectory.header is None:
            problem = trajectory.damage if trajectory else f"{self.trajectory} does not exist"
            raise NothingToResumeError(f"{problem}; is {self.path} a zo run?")
        return trajectory.header

    def step_records(self) -> list[dict[str, Any]]:
        """Step records up to the first unreadable line: for plots, not for replay."""
        return [r for r in read_jsonl(self.trajectory) if r.get("type") == "step"]

    def append(self, path: Path, record: dict[str, Any]) -> None:
        """One whole line; a trajectory step record gets its chained checksum (format 2)."""
        if path == self.trajectory and record.get("type") == "step":
            self._records += 1
            if self._format >= 2:
                record = {**record, "check": chained_check(self._check or "", record)}
                self._check = record["check"]
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write a fresh folder, then swap it in: a kill leaves old or new, never half."""
        staging = self.path / checkpoints.STAGING
        shutil.rmtree(staging, ignore_errors=True)
        for log_file in (self.trajectory, self.metrics):  # on disk before what they cover
            fsync_path(log_file)
        mark = TrajectoryMark(self._records, self._check)
        checkpoints.write_checkpoint(staging, checkpoint, mark)
        checkpoints.install(self.path, staging, self.keep_checkpoints)

    def has_checkpoint(self) -> bool:
        return bool(checkpoints.candidates(self.path))

    def load_checkpoint(
        self, device: torch.device | str = "cpu", optimizer: bool = True, log=print
    ) -> Checkpoint:
        """The newest checkpoint that verifies (saying which were skipped and why)."""
        return self.newest_checkpoint(device, optimizer, log)[1]

    def newest_checkpoint(
        self,
        device: torch.device | str = "cpu",
        optimizer: bool = True,
        log: Callable[[str], None] = print,
        at_most: int | None = None,
    ) -> tuple[CheckpointState, Checkpoint]:
        """Newest first, skipping damaged folders (and those past step ``at_most``). Safe
        beside a live run: a folder rotated away while being read is listed again."""
        for _ in range(10):
            problems = []
            try:
                for folder in checkpoints.candidates(self.path):
                    try:
                        if at_most is not None and checkpoints.read_state(folder).step > at_most:
                            continue
                        state, checkpoint = checkpoints.load(folder, device, optimizer, log)
                    except RunDamagedError as error:
                        problems.append(str(error))
                        continue
                    for problem in problems:
                        log(f"skipped a damaged checkpoint: {problem}")
                    return state, checkpoint
            except CheckpointVanished:
                continue  # a live run rotated its checkpoints meanwhile
            if problems:
                raise RunDamagedError("; ".join(problems))
            raise NothingToResumeError(f"{self.path} has no checkpoint")
        raise RunDamagedError(f"{self.path}: checkpoints kept changing while being read")

    def owns(self, path: Path) -> bool:
        """``path`` is this run's folder or one of its checkpoint folders."""
        target, root = path.resolve(), self.path.resolve()
        return target == root or (target.parent == root and target.name.startswith("checkpoint"))

    def replay_sources(
        self, device: torch.device | str, compare: bool, log: Callable[[str], None] = print
    ) -> tuple[Trajectory, Checkpoint | None]:
        """The verified trajectory, and (``compare``) the newest verified checkpoint's
        tensors. The checkpoint is read first: a live run appends a step's record before
        any checkpoint that covers it, so the trajectory read after holds its records."""
        saved = None
        if compare and self.has_checkpoint():
            try:
                state, saved = self.newest_checkpoint(device, optimizer=False, log=log)
            except RunDamagedError as error:
                raise RunDamagedError(
                    f"{error}; `zo replay --no-compare` rebuilds the weights from the "
                    "trajectory alone"
                ) from None
        trajectory = read_trajectory(self.trajectory)
        if trajectory.damage:
            raise RunDamagedError(
                f"{trajectory.damage}; replay refuses a damaged trajectory (it would rebuild "
                "other weights than the run's)"
            )
        if trajectory.cut_tail:
            log(
                f"{self.trajectory}: the last line is incomplete (cut by a kill, or still "
                "being written by a live run): ignored"
            )
        if saved is not None:
            problem = checkpoint_fits(state, trajectory, records_per_step=True)
            if problem:
                raise RunDamagedError(f"{state.folder}: {problem}")
        return trajectory, saved

    # ------------------------------------------------------------------ resume
    def plan_resume(
        self, records_per_step: bool, repair: bool, log: Callable[[str], None] = print
    ) -> ResumePlan:
        """Read and verify everything a resume needs; write nothing.

        ``records_per_step``: the estimator logs one trajectory record per step (every
        zeroth-order one), so a checkpoint at step S needs S intact records.
        """
        if self.half_created():
            return ResumePlan(None)
        if not self.trajectory.exists():
            raise RunDamagedError(
                f"{self.trajectory} is missing, but the run has a checkpoint: its steps can "
                "be neither verified nor replayed; restore the file, or train a new run "
                "(another train.out)"
            )
        trajectory = read_trajectory(self.trajectory)
        metrics = scan_jsonl(self.metrics) if self.metrics.exists() else None
        plan = ResumePlan(trajectory, metrics)
        if plan.damaged and not repair:
            raise RunDamagedError(
                f"{plan.damaged[0].damage}; resume never rewrites a damaged file: {REPAIR_HINT}"
            )
        for folder in checkpoints.candidates(self.path):
            try:
                state = checkpoints.verify(folder, optimizer=True)
            except RunDamagedError as error:
                plan.skipped.append((folder, str(error)))
                continue
            problem = checkpoint_fits(state, trajectory, records_per_step)
            if problem:
                plan.skipped.append((folder, f"{folder}: {problem}"))
                continue
            plan.state = state
            plan.records = records_covered(state, records_per_step)
            break
        if plan.skipped and plan.state is None and not repair:
            raise RunDamagedError(
                f"no checkpoint of {self.path} can be trusted: "
                + "; ".join(reason for _, reason in plan.skipped)
                + "; pass train.repair=true to set them aside and start the run over from "
                "step 0, or restore them"
            )
        return plan

    def check_header(self, plan: ResumePlan, header: dict[str, Any], log=print) -> None:
        """The run's header against this setup's: refuse a changed model, trainable set,
        estimator or engine (say so when only the device or torch version differs)."""
        if plan.trajectory is None or plan.trajectory.header is None:
            return  # written afresh by commit_resume
        saved = plan.trajectory.header
        mismatch = header_mismatch(saved, header)
        if mismatch:
            raise RunDamagedError(
                f"{self.trajectory} line 1: {mismatch}; resume and replay need the run's own "
                "base model, trainable set, estimator and engine"
            )
        for key in ("device_type", "torch_version"):
            if saved.get(key) not in (None, header.get(key)):
                log(
                    f"the run was trained with {key} {saved[key]}, this process has "
                    f"{header.get(key)}: later steps may not be bit-identical to an "
                    "uninterrupted run"
                )

    def commit_resume(
        self, plan: ResumePlan, header: dict[str, Any], config_yaml: str, log=print
    ) -> None:
        """Carry out ``plan``: set aside what it skipped, back up damaged files (repair),
        drop the records and metrics past the resume point."""
        self._clean_leftovers()
        if plan.trajectory is None:
            log(
                f"{self.path} was killed while being created (config.yaml, no trajectory "
                "header): starting it over from step 0"
            )
            self._write_initial(config_yaml, header)
            return
        for folder, reason in plan.skipped:
            moved = checkpoints.set_aside(folder)
            log(f"skipped a checkpoint that cannot be trusted ({reason}); kept as {moved.name}")
        for damaged in plan.damaged:
            backup = _keep_copy(damaged.path)
            log(f"repair: {damaged.damage}; the file as it was is kept as {backup.name}")
        trajectory = plan.trajectory
        if trajectory.header_line is None:
            lines = [self._header_line(header)]  # repair of a missing or garbled header
        else:
            self._format = trajectory.format
            self.metrics_format = metrics_format(trajectory.header or {})
            lines = [trajectory.header_line, *(s.text for s in trajectory.steps[: plan.records])]
            self._check = trajectory.checks[plan.records]
        self._records = plan.records
        _rewrite(self.trajectory, "".join(lines))
        kept = [
            line.text
            for line in (plan.metrics.lines if plan.metrics else [])
            if _covered(line.record, plan.start_step, self.metrics_format)
        ]
        _rewrite(self.metrics, "".join(kept))

    def _clean_leftovers(self) -> None:
        """What a killed owner left: an unfinished checkpoint, half-deleted folders, temp
        files. Only the lock holder calls this (nobody else writes here)."""
        shutil.rmtree(self.path / checkpoints.STAGING, ignore_errors=True)
        for leftover in self.path.glob(f"{checkpoints.DELETING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for temp in self.path.glob(".*.tmp"):
            temp.unlink(missing_ok=True)


def _keep_copy(path: Path) -> Path:
    """A complete copy of ``path`` as ``NAME.damaged-TIME`` (written whole, then renamed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        backup = path.with_name(f"{path.name}.damaged-{stamp}{f'.{n}' if n else ''}")
        if not backup.exists():
            break
    temp = path.with_name(f".{backup.name}.tmp")
    shutil.copy2(path, temp)
    os.replace(temp, backup)
    return backup


def metrics_format(header: dict[str, Any]) -> int:
    """The numbering of a run's metrics.jsonl, read from its trajectory header."""
    return int(header.get("metrics_format", 1))


def _covered(record: dict[str, Any], step: int, numbering: int) -> bool:
    """The metrics line was logged by the run up to the checkpoint at ``step``: format 2
    logs step ``n`` after ``n`` updates (0: zero-shot, evaluated again when a run starts
    over from step 0), format 1 logged ``n - 1``."""
    logged = record.get("step")
    if not isinstance(logged, int):
        return False
    if numbering >= 2:
        return step > 0 and logged <= step
    return logged < step


def _rewrite(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(errors="replace") != text:
        atomic_write_text(path, text)


class ReplicaRunDirectory(RunDirectory):
    """A run directory as the other ranks of a data-parallel run see it: they read it (to
    resume) and rank 0 alone writes, so every write here does nothing."""

    def create(self, config_yaml: str, header: dict[str, Any]) -> None:
        pass  # rank 0 creates it: checking here would race with that

    def append(self, path: Path, record: dict[str, Any]) -> None:
        pass

    def commit_resume(
        self, plan: ResumePlan, header: dict[str, Any], config_yaml: str, log=print
    ) -> None:
        pass

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass
