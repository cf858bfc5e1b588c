"""An output directory written all at once: built in a staging sibling, then renamed into place.

``zo export`` and ``zo merge`` write model directories of many files. Built in
``.<name>.staging-<host>-<pid>`` next to ``--out`` (same file system, so the rename is
atomic) and renamed when complete, a crash never leaves a half-written model where a loader
would find it. A staging directory left by a dead process of this host is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from zo.run_files import file_mode, fsync_path


class OutputDirectoryError(ValueError):
    """``--out`` cannot be written as asked (in the way, or would destroy an input)."""


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.staging-{socket.gethostname()}-"


def _old_prefix(out: Path) -> str:
    """The previous ``out``, moved aside during ``--overwrite``'s two renames."""
    return f".{out.name}.old-{socket.gethostname()}-"


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (this process included: its threads may be
    writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def recover_interrupted(out: Path) -> list[Path]:
    """Undo what a writer of ``out`` killed midway left (its process, on this host, gone):
    a previous ``out`` moved aside is moved back if the kill fell between the two renames
    (removed if the new ``out`` made it), and staging directories are removed. Returns the
    paths removed."""
    removed = []
    for prefix in (_old_prefix(out), _staging_prefix(out)):  # the previous out first
        for candidate in out.parent.glob(f"{prefix}*"):
            pid_text = candidate.name[len(prefix) :]
            if not pid_text.isdigit() or process_alive(int(pid_text)):
                continue
            if prefix == _old_prefix(out) and not out.exists():
                os.replace(candidate, out)
            else:
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
    return removed


def check_output(out: Path, overwrite: bool, protected: Iterable[Path] = ()) -> None:
    """Refuse an ``out`` that is a file, a non-empty directory (unless ``overwrite``), or one
    of ``protected`` (the inputs) or a folder holding one: replacing it would delete them."""
    resolved = out.resolve()
    for path in protected:
        inside = path.resolve()
        if resolved == inside or resolved in inside.parents:
            raise OutputDirectoryError(
                f"--out {out} is or holds {path}, which this command reads: choose another --out"
            )
    if out.is_file() or out.is_symlink():
        raise OutputDirectoryError(f"--out {out} is a file; choose a directory path")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputDirectoryError(
            f"--out {out}: {above}, on its path, is a file; choose a directory path"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirectoryError(
            f"--out {out} already exists and is not empty (pass --overwrite to replace it)"
        )


@contextlib.contextmanager
def staged_directory(
    out: str | os.PathLike[str], overwrite: bool = False, protected: Iterable[Path] = ()
) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends without error it becomes ``out``.

    On an error the staging directory is removed and ``out`` is left as it was.
    """
    out = Path(out).expanduser()
    if out.parent.is_dir():
        recover_interrupted(out)  # before the checks: a restored out counts as existing
    check_output(out, overwrite, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f"{_staging_prefix(out)}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _honour_umask(staging)
        fsync_path(staging)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _honour_umask(directory: Path) -> None:
    """Files as ``open`` would create them (safetensors writes its files 0600)."""
    mode = file_mode()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _publish(staging: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f"{_old_prefix(out)}{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)  # onto nothing, or onto an empty directory
    fsync_path(out.parent)
