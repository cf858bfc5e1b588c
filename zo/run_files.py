"""Files of a run directory: written atomically, read back with checks.

Writers replace whole files (temp file + rename) or append whole JSON lines, so a kill at any
instant leaves either the old or the new content, plus at most one incomplete last line.
Readers tell that kill artefact apart from damage (a garbled complete line), which they
report with the file and line instead of skipping it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


class RunDamagedError(ValueError):
    """A file of a run cannot be trusted (garbled, truncated, checksum mismatch); it is named
    and left as it is. The CLI exits with code 2."""


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


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk; nothing if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(fd: int) -> str:
    """The sha256 of an open file's whole content, read in chunks (position left at 0)."""
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 22):
        digest.update(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return digest.hexdigest()


def canonical_json(record: dict[str, Any]) -> str:
    """One spelling per record, so a checksum survives a parse and re-dump."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def chained_check(previous: str, record: dict[str, Any]) -> str:
    """The checksum of a record, chained to the one before it (so a record moved, dropped or
    spliced in from another run breaks the chain as surely as a changed byte)."""
    return hashlib.sha256((previous + canonical_json(record)).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Complete JSON lines up to the first one that does not parse: for logs that are only
    shown (plots, summaries). Resume and replay read with :func:`scan_jsonl`."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                break


@dataclass
class JsonLine:
    number: int
    """1-based line number in the file."""
    text: str
    """The line as stored, newline included."""
    record: dict[str, Any]


@dataclass
class JsonlScan:
    """A JSON-lines file read up to its first damaged line."""

    path: Path
    lines: list[JsonLine] = field(default_factory=list)
    """The complete, well-formed lines before the first damage."""
    damage: str | None = None
    """``FILE line N: what is wrong``; None when every complete line is well formed."""
    damaged_line: int | None = None
    cut_tail: bool = False
    """The file ends in a line without a newline: a write cut by a kill, not damage."""

    def fail(self, number: int, problem: str) -> None:
        self.damage, self.damaged_line = f"{self.path} line {number}: {problem}", number


def scan_jsonl(path: Path) -> JsonlScan:
    """Every complete line parsed as a JSON object; stops at the first one that is not."""
    scan = JsonlScan(path)
    *complete, tail = path.read_bytes().split(b"\n")
    scan.cut_tail = bool(tail)
    for number, line in enumerate(complete, start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            scan.fail(number, "is not valid JSON (the line is garbled)")
            break
        if not isinstance(record, dict):
            scan.fail(number, "is not a JSON object (the line is garbled)")
            break
        scan.lines.append(JsonLine(number, line.decode("utf-8") + "\n", record))
    return scan
