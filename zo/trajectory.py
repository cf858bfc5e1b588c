"""The run directory: resolved config, logs, the seeds-and-scalars trajectory, checkpoints.

Every write is atomic (temp file + rename) or an append of whole JSON lines, so a run
killed at any instant (``kill -9`` included) leaves a directory that ``resume`` can
continue: incomplete lines and steps past the last checkpoint are dropped on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAJECTORY_FORMAT = 1


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Complete JSON lines only: a line cut by a crash is skipped, not an error."""
    if not path.exists():
        return
    with open(path) as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                break


class RunExistsError(ValueError):
    pass


class ReplayError(ValueError):
    """A run cannot be replayed as asked (another base model, a gradient-based estimator)."""


class NothingToResumeError(ValueError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    step: int
    """Number of completed steps."""
    tensors: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    extra: dict[str, Any]


class RunDirectory:
    """Paths and safe writes of one run; knows nothing of models or estimators."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.trajectory = self.path / "trajectory.jsonl"
        self.checkpoint_dir = self.path / "checkpoint"
        self.summary = self.path / "summary.json"
        self.plot = self.path / "loss.png"

    # ------------------------------------------------------------------ life cycle
    def holds_run(self) -> bool:
        return self.trajectory.exists() or self.config.exists()

    def ensure_new(self) -> None:
        if self.holds_run():
            raise RunExistsError(
                f"run directory {self.path} already holds a run; pass resume=true to "
                "continue it, or choose another train.out"
            )

    def create(self, config_yaml: str, header: dict[str, Any]) -> None:
        self.ensure_new()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config_yaml)
        atomic_write_text(self.trajectory, json.dumps({"type": "header", **header}) + "\n")
        atomic_write_text(self.metrics, "")

    def header(self) -> dict[str, Any]:
        for record in read_jsonl(self.trajectory):
            if record.get("type") == "header":
                return record
            break
        raise NothingToResumeError(f"{self.trajectory} has no header; is {self.path} a zo run?")

    def step_records(self) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.trajectory) if r.get("type") == "step"]

    def append(self, path: Path, record: dict[str, Any]) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def rewind(self, step: int) -> None:
        """Drop every logged step at or past ``step`` (and any cut line): resume point."""
        for path in (self.trajectory, self.metrics):
            kept = [
                r for r in read_jsonl(path) if r.get("type") == "header" or r.get("step", -1) < step
            ]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write to a fresh folder, then swap it in: a kill leaves old or new, never half."""
        staging = self.path / "checkpoint.tmp"
        previous = self.path / "checkpoint.old"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_tensors_atomic(checkpoint.tensors, staging / "trainable.safetensors")
        torch.save(checkpoint.optimizer_state, staging / "optimizer.pt")
        atomic_write_text(
            staging / "state.json", json.dumps({"step": checkpoint.step, **checkpoint.extra})
        )
        _fsync_dir(staging)
        if self.checkpoint_dir.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(self.checkpoint_dir, previous)
        os.replace(staging, self.checkpoint_dir)
        _fsync_dir(self.path)
        shutil.rmtree(previous, ignore_errors=True)

    def _usable_checkpoint_dir(self) -> Path | None:
        shutil.rmtree(self.path / "checkpoint.tmp", ignore_errors=True)  # never completed
        for candidate in (self.checkpoint_dir, self.path / "checkpoint.old"):
            if (candidate / "state.json").exists():
                return candidate
        return None

    def has_checkpoint(self) -> bool:
        return self._usable_checkpoint_dir() is not None

    def load_checkpoint(self, device: torch.device | str = "cpu") -> Checkpoint:
        folder = self._usable_checkpoint_dir()
        if folder is None:
            raise NothingToResumeError(f"{self.path} has no checkpoint")
        state = json.loads((folder / "state.json").read_text())
        step = state.pop("step")
        tensors = load_file(str(folder / "trainable.safetensors"), device=str(device))
        optimizer_state = torch.load(
            folder / "optimizer.pt", map_location=device, weights_only=True
        )
        return Checkpoint(step, tensors, optimizer_state, state)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReplicaRunDirectory(RunDirectory):
    """A run directory as the other ranks of a data-parallel run see it: they read it (to
    resume) and rank 0 alone writes, so every write here does nothing."""

    def create(self, config_yaml: str, header: dict[str, Any]) -> None:
        pass  # rank 0 creates it: checking here would race with that

    def append(self, path: Path, record: dict[str, Any]) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass
