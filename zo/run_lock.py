"""One process owns a run directory at a time: an OS lock on ``RUN/.lock``.

The lock is ``fcntl.flock`` on a file inside the run directory, holding the owner's pid
and host. The kernel releases it when the owner exits, however it exits (``kill -9``
included), so a killed run can be resumed at once and a stale lock file means nothing.
Training takes it before it looks at the directory; ``zo replay`` and ``zo eval`` take
none: they read only complete checkpoint folders and complete trajectory lines, which a
live run never changes (see :mod:`zo.checkpoint`).
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zo.config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLockedError(ValueError):
    """Another live process owns the run directory (the CLI exits with code 2)."""


class RunLock:
    def __init__(self, run: Path):
        self.run = Path(run)
        self.path = self.run / LOCK_NAME
        self.fd: int | None = None
        self._created: Path | None = None
        """The outermost directory this lock created (removed again if the run never starts)."""

    def acquire(self) -> None:
        if fcntl is None:
            warnings.warn(
                f"this platform has no fcntl.flock: nothing keeps a second process off run "
                f"directory {self.run}; start one zo train per directory",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self._created = _first_missing(self.run)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                os.close(fd)
                self._created = None
                who = f"process {holder[0]}" if holder else "another process"
                where = f" on host {holder[1]}" if len(holder) > 1 else ""
                raise RunLockedError(
                    f"run directory {self.run} is in use by {who}{where}; wait for it to "
                    "finish or stop it (the lock goes with that process, kill -9 included), "
                    "or choose another train.out"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was removed by a run that never started: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def _open(self) -> int:
        try:
            self.run.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise ConfigError(f"train.out {self.run} exists and is not a directory") from None
        except NotADirectoryError:
            raise ConfigError(f"train.out {self.run}: a part of the path is a file") from None
        except PermissionError:
            raise ConfigError(
                f"train.out {self.run}: permission denied (cannot create the run directory "
                "or its lock file); choose a writable train.out"
            ) from None

    def release(self) -> None:
        if self.fd is None:
            return
        if self._created is not None and _holds_only_lock(self.run):
            # the run never started: leave no directory behind
            self.path.unlink(missing_ok=True)
            _remove_empty(self.run, self._created)
        os.close(self.fd)
        self.fd = None


@contextmanager
def run_lock(run: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``run``'s lock for the block (``enabled=False``: ranks that do not write)."""
    if not enabled:
        yield
        return
    lock = RunLock(Path(run))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _first_missing(path: Path) -> Path | None:
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _holds_only_lock(run: Path) -> bool:
    try:
        return [p.name for p in run.iterdir()] == [LOCK_NAME]
    except OSError:
        return False


def _remove_empty(run: Path, outermost: Path) -> None:
    path = run.absolute()
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == outermost:
            return
        path = path.parent
