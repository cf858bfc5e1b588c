"""Damaged run directories for :mod:`zo.fuzz`: trajectory and metrics lines garbled,
dropped, repeated or swapped; state.json, tensors, optimizer state and config.yaml
truncated, flipped, emptied, garbled or deleted; stray checkpoint folders.

Each damage takes a seeded ``random.Random`` and the file (or the run) and returns what
it did, to name the case.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from zo.fuzz_configs import word, yaml_bytes

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
        data["train"][word(rng)] = 1
        raw = yaml_bytes(data)
    elif kind == "wrong type":
        data["train"]["steps"] = rng.choice(["four", [4], 4.5])
        raw = yaml_bytes(data)
    else:
        del data[rng.choice(["model", "task"])]
        raw = yaml_bytes(data)
    path.write_bytes(raw)
    return kind


def extra_folder(rng: random.Random, run: Path) -> str:
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
