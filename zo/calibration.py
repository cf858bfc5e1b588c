"""Calibration text for sensitivity masks: the bundled corpus or user files, cut into chunks.

The bundled corpus (``zo/data/calibration/*.txt``) is a few KB of plain English prose
written for this project; it is enough to rank parameters by squared gradient, which is
what sensitive masks need (SensZOQ finds the ranking transfers across tasks). User files
are ``.txt`` (documents separated by blank lines) or ``.jsonl`` (one object per line with a
``"text"`` field).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "calibration"
BUNDLED_SOURCE = "bundled"
"""What mask metadata records as the source when the bundled corpus was used."""


class CalibrationError(ValueError):
    """Calibration text that cannot be used: missing, empty, malformed, or too short."""


def bundled_paths() -> list[Path]:
    """The bundled corpus files, sorted by name (the order texts are read in)."""
    paths = sorted(BUNDLED_DIR.glob("*.txt"))
    if not paths:
        raise CalibrationError(
            f"the bundled calibration corpus is missing from {BUNDLED_DIR}; reinstall zo "
            "or pass calibration files explicitly"
        )
    return paths


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_txt(path: Path) -> list[str]:
    return _paragraphs(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CalibrationError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f'{path}:{number}: expected an object with a "text" string')
        if record["text"].strip():
            texts.append(record["text"].strip())
    return texts


READERS: dict[str, Callable[[Path], list[str]]] = {".txt": _read_txt, ".jsonl": _read_jsonl}
"""File suffix -> reader returning the file's documents."""


def read_texts(paths: Sequence[str | os.PathLike[str]] | None = None) -> list[str]:
    """The documents of ``paths`` in order (``None`` or empty: the bundled corpus)."""
    files = [Path(p) for p in paths] if paths else bundled_paths()
    texts: list[str] = []
    for path in files:
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise CalibrationError(
                f"calibration file {path}: unsupported type {path.suffix or '(none)'}; "
                f"use one of {sorted(READERS)}"
            )
        documents = reader(path)
        if not documents:
            raise CalibrationError(f"calibration file {path} holds no text")
        texts.extend(documents)
    return texts


def source_label(paths: Sequence[str | os.PathLike[str]] | None) -> str:
    """How mask metadata names the calibration data: file names, or ``bundled``."""
    return ",".join(Path(p).name for p in paths) if paths else BUNDLED_SOURCE


def tokenize_chunks(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Concatenate the documents (EOS between them) and cut ``[n, seq_len]`` token chunks.

    The tail shorter than ``seq_len`` is dropped so every chunk is full (no padding, every
    token has a label). ``max_tokens`` keeps the first ``max_tokens // seq_len`` chunks.
    """
    if seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2 (got {seq_len})")
    if max_tokens is not None and max_tokens < seq_len:
        raise CalibrationError(
            f"--tokens {max_tokens} is less than one chunk of seq_len {seq_len}; raise it or "
            "lower --seq-len"
        )
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        # verbose=False: a document longer than the model's context is fine, it is cut below
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.extend(separator)
    chunks = len(ids) // seq_len
    if max_tokens is not None:
        chunks = min(chunks, max_tokens // seq_len)
    if chunks == 0:
        raise CalibrationError(
            f"the calibration text has {len(ids)} tokens, fewer than one chunk of seq_len "
            f"{seq_len}; give more text or lower --seq-len"
        )
    return torch.tensor(ids[: chunks * seq_len], dtype=torch.long).view(chunks, seq_len)
