"""Checkpoint folders: trainable tensors, optimizer state and a ``state.json`` written last.

``state.json`` is the folder's manifest: the step, the sha256 of every other file, where
the trajectory stood when the folder was written (step records and the chained checksum of
the last one) and a checksum of itself. A folder is complete once its ``state.json`` is in
place; readers verify every checksum before they use a byte, so a flipped bit, a truncated
file or a folder from another history is refused with its name.

Layout in a run directory: ``checkpoint/`` is always the newest; with
``train.keep_checkpoints`` k > 1, the k - 1 before it stay as ``checkpoint-STEP/``. A folder
is written as ``checkpoint.tmp/`` and swapped in by renames, and older ones are deleted only
after the new one is in place, so a kill at any instant leaves complete folders only.
A folder in place never changes: a reader that holds it open (:class:`_Pinned`) reads one
consistent checkpoint even while a live run rotates them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from zo.run_files import (
    RunDamagedError,
    atomic_write_text,
    canonical_json,
    fsync_path,
    save_tensors_atomic,
    sha256_of,
)

TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.pt", "state.json"
CHECKPOINT_FORMAT = 2
"""1: ``{"step", "zero_shot"}`` only (no checksums); 2: adds files, trajectory and check."""
_BOOKKEEPING = ("format", "files", "trajectory", "check")
_NUMBERED = re.compile(r"checkpoint-(\d+)")
NEWEST, STAGING, LEGACY_PREVIOUS = "checkpoint", "checkpoint.tmp", "checkpoint.old"
DELETING_PREFIX = ".deleting-"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    """Number of completed steps."""
    tensors: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    extra: dict[str, Any]


@dataclass(frozen=True)
class TrajectoryMark:
    """Where the trajectory stood when a checkpoint was written."""

    records: int
    """Step records in trajectory.jsonl (0 for gradient-based estimators, which log none)."""
    check: str | None
    """Chained checksum of the last of them (of the header when there are none); None for a
    trajectory of format 1, which has no checksums."""


@dataclass(frozen=True)
class CheckpointState:
    """A folder's ``state.json``, checked."""

    folder: Path
    step: int
    extra: dict[str, Any]
    files: dict[str, str] | None
    """sha256 per file; None for a folder written before checkpoints carried checksums."""
    mark: TrajectoryMark | None


class CheckpointVanished(FileNotFoundError):
    """The folder was rotated away by a live run between listing and opening: list again."""


# ---------------------------------------------------------------------- writing


def write_checkpoint(folder: Path, checkpoint: Checkpoint, mark: TrajectoryMark) -> None:
    """Every file of ``checkpoint`` into the new ``folder``; ``state.json`` last."""
    folder.mkdir(parents=True)
    save_tensors_atomic(checkpoint.tensors, folder / TRAINABLE)
    torch.save(checkpoint.optimizer_state, folder / OPTIMIZER)
    files = {}
    for name in (TRAINABLE, OPTIMIZER):
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
            files[name] = sha256_of(fd)
        finally:
            os.close(fd)
    state = {
        "step": checkpoint.step,
        **checkpoint.extra,
        "format": CHECKPOINT_FORMAT,
        "files": files,
        "trajectory": {"records": mark.records, "check": mark.check},
    }
    state["check"] = _self_check(state)
    atomic_write_text(folder / STATE, json.dumps(state) + "\n")
    fsync_path(folder)


def _self_check(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "check"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()[:16]


def install(run: Path, staging: Path, keep: int) -> None:
    """Swap the complete ``staging`` folder in as ``checkpoint/``; keep ``keep`` in all."""
    newest = run / NEWEST
    if newest.exists():
        step = _step_of(newest)
        previous = run / f"checkpoint-{step}" if step is not None else damaged_name(run, "x")
        delete(previous)  # the same step written again: a duplicate
        os.replace(newest, previous)
    os.replace(staging, newest)
    fsync_path(run)
    for old in [*numbered(run)[keep - 1 :], run / LEGACY_PREVIOUS]:
        delete(old)


def delete(folder: Path) -> None:
    """Rename, then remove: a reader holding the folder open sees it gone as a whole (see
    :meth:`_Pinned.open`), never a folder with some files missing."""
    if not folder.exists():
        return
    doomed = folder.with_name(f"{DELETING_PREFIX}{folder.name}-{os.getpid()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def set_aside(folder: Path) -> Path:
    """Move a damaged (or orphaned) folder out of the rotation; never delete it."""
    step = _step_of(folder)
    target = damaged_name(folder.parent, str(step) if step is not None else "x")
    os.replace(folder, target)
    return target


def damaged_name(run: Path, tag: str) -> Path:
    for n in itertools.count():
        candidate = run / f"checkpoint.damaged-{tag}{f'.{n}' if n else ''}"
        if not candidate.exists():
            return candidate
    raise AssertionError("unreachable")


def numbered(run: Path) -> list[Path]:
    """The ``checkpoint-STEP/`` folders, newest first."""
    found = [
        (int(m.group(1)), p) for p in run.glob("checkpoint-*") if (m := _NUMBERED.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def candidates(run: Path) -> list[Path]:
    """Every checkpoint folder of a run, newest first (``checkpoint.tmp`` never completed;
    ``checkpoint.old`` is what a kill inside an older zo's swap left)."""
    folders = [run / NEWEST, *numbered(run), run / LEGACY_PREVIOUS]
    return [f for f in folders if f.is_dir()]


def _step_of(folder: Path) -> int | None:
    try:
        return read_state(folder).step
    except (RunDamagedError, OSError):
        return None


# ---------------------------------------------------------------------- reading


class _Pinned:
    """A folder held open: files opened through it belong to that folder even if a live
    run renames or deletes it meanwhile."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            self.fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise CheckpointVanished(str(folder)) from None
        except NotADirectoryError:
            raise RunDamagedError(f"{folder} is not a checkpoint folder") from None

    def open(self, name: str) -> int:
        try:
            return os.open(name, os.O_RDONLY, dir_fd=self.fd)
        except FileNotFoundError:
            if not self._still_in_place():
                raise CheckpointVanished(str(self.folder)) from None
            raise RunDamagedError(f"{self.folder / name} is missing") from None

    def _still_in_place(self) -> bool:
        try:
            return os.stat(self.folder).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def _pinned(folder: Path) -> Iterator[_Pinned]:
    pin = _Pinned(folder)
    try:
        yield pin
    finally:
        pin.close()


def read_state(folder: Path, pin: _Pinned | None = None) -> CheckpointState:
    """``state.json`` of ``folder``, with its own checksum and field types checked."""
    path = folder / STATE
    if pin is None:
        with _pinned(folder) as own:
            return read_state(folder, own)
    fd = pin.open(STATE)
    try:
        raw = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDamagedError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(state, dict) or not _is_count(state.get("step")):
        raise RunDamagedError(f"{path} has no step count: the file is damaged")
    if "check" in state and state["check"] != _self_check(state):
        raise RunDamagedError(
            f"{path}: its checksum does not match its content (changed after it was written)"
        )
    files, mark = state.get("files"), state.get("trajectory")
    if "format" in state:
        if not isinstance(state["format"], int) or state["format"] > CHECKPOINT_FORMAT:
            raise RunDamagedError(
                f"{path} is of checkpoint format {state['format']!r}; this zo reads up to "
                f"{CHECKPOINT_FORMAT}: update zo"
            )
        if (
            not isinstance(files, dict)
            or not all(isinstance(v, str) for v in files.values())
            or not isinstance(mark, dict)
            or not _is_count(mark.get("records"))
        ):
            raise RunDamagedError(f"{path} lacks its file checksums or trajectory mark: damaged")
    extra = {k: v for k, v in state.items() if k not in ("step", *_BOOKKEEPING)}
    return CheckpointState(
        folder,
        state["step"],
        extra,
        files,
        TrajectoryMark(mark["records"], mark.get("check")) if isinstance(mark, dict) else None,
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify(folder: Path, optimizer: bool = True) -> CheckpointState:
    """Check a folder without loading it: every checksum; for a folder without checksums
    (an older zo's), that its files are whole (safetensors header and sizes, zip index)."""
    with _pinned(folder) as pin:
        state = read_state(folder, pin)
        with _opened(pin, optimizer) as fds:
            if state.files is not None:
                _check_sums(state, fds)
            else:
                _check_structure(fds, folder)
    return state


def load(
    folder: Path,
    device: torch.device | str = "cpu",
    optimizer: bool = True,
    log: Callable[[str], None] = print,
    verified: bool = False,
) -> tuple[CheckpointState, Checkpoint]:
    """Read and verify one folder; ``optimizer=False`` reads only tensors and state
    (replay and eval need nothing else); ``verified``: :func:`verify` passed just now, under
    the run's lock. Raises :class:`CheckpointVanished` when a live run rotated the folder
    away meanwhile, :class:`RunDamagedError` naming the file otherwise."""
    with _pinned(folder) as pin:
        state = read_state(folder, pin)
        with _opened(pin, optimizer) as fds:
            if state.files is None:
                log(f"{folder} was written before checkpoints carried checksums: loaded unverified")
            elif not verified:
                _check_sums(state, fds)
            tensors = _load_tensors(fds[TRAINABLE], folder / TRAINABLE, device)
            optimizer_state = (
                _load_optimizer(fds[OPTIMIZER], folder / OPTIMIZER, device) if optimizer else {}
            )
    return state, Checkpoint(state.step, tensors, optimizer_state, state.extra)


@contextmanager
def _opened(pin: _Pinned, optimizer: bool) -> Iterator[dict[str, int]]:
    fds: dict[str, int] = {}
    try:
        for name in [TRAINABLE, OPTIMIZER] if optimizer else [TRAINABLE]:
            fds[name] = pin.open(name)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _check_sums(state: CheckpointState, fds: dict[str, int]) -> None:
    assert state.files is not None
    for name, fd in fds.items():
        if name not in state.files:
            raise RunDamagedError(f"{state.folder / STATE} has no checksum for {name}")
        if sha256_of(fd) != state.files[name]:
            raise RunDamagedError(
                f"{state.folder / name}: its sha256 differs from the one in {STATE} (the file "
                "changed after it was written)"
            )


def _check_structure(fds: dict[str, int], folder: Path) -> None:
    try:
        with safe_open(_fd_path(fds[TRAINABLE], folder / TRAINABLE), framework="pt") as handle:
            list(handle.keys())
    except Exception as error:  # safetensors raises its own error type or OSError
        raise RunDamagedError(
            f"{folder / TRAINABLE} is not a readable safetensors file ({error})"
        ) from None
    if OPTIMIZER in fds:
        try:
            with zipfile.ZipFile(_fd_path(fds[OPTIMIZER], folder / OPTIMIZER)) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            raise RunDamagedError(
                f"{folder / OPTIMIZER} is not a readable optimizer state ({error})"
            ) from None
        if bad is not None:
            raise RunDamagedError(f"{folder / OPTIMIZER}: entry {bad} fails its CRC check")


def _fd_path(fd: int, path: Path) -> str:
    """A path that opens the very file behind ``fd`` (``/dev/fd``), so loaders that take a
    path still read the pinned file; the plain path where there is no ``/dev/fd``."""
    return f"/dev/fd/{fd}" if os.path.isdir("/dev/fd") else str(path)


def _load_tensors(fd: int, path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        return load_file(_fd_path(fd, path), device=str(device))
    except Exception as error:  # safetensors raises its own error type or OSError
        raise RunDamagedError(f"{path} is not a readable safetensors file ({error})") from None


def _load_optimizer(fd: int, path: Path, device: torch.device | str) -> dict[str, Any]:
    try:
        state = torch.load(_fd_path(fd, path), map_location=device, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError...
        raise RunDamagedError(f"{path} is not a readable optimizer state ({error})") from None
    if not isinstance(state, dict):
        raise RunDamagedError(f"{path} is not an optimizer state (a {type(state).__name__})")
    return state
