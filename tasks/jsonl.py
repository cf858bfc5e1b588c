"""Reading a local JSONL file through `datasets`, without the hub and without leftovers.

`datasets.load_dataset("json", ...)` uses the packaged JSON builder, which reads local
files and never contacts the hub. By default it would also write an Arrow copy of every
file it reads into `~/.cache/huggingface/datasets`, keyed on path and mtime: one stale
entry per temporary file in the tests, and no speed-up for files of a few hundred rows.
So each read goes through a throw-away cache directory and is kept in memory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file, in order.

    Raises FileNotFoundError for a missing file and ValueError (naming the path, and the
    line for a bad one) for an empty or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(str(path))
    if not _has_a_row(path):
        raise ValueError(f"data file {path} is empty")
    import datasets  # here, not at the top: `import tasks` must stay fast

    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a "Generating train split" bar per small file is noise
    try:
        with tempfile.TemporaryDirectory(prefix="zo-tasks-") as cache_dir:
            table = datasets.load_dataset(
                "json",
                data_files={"rows": str(path)},
                split="rows",
                cache_dir=cache_dir,
                keep_in_memory=True,
            )
            rows = table.to_list()
    except Exception as error:  # datasets wraps parse errors without a line number
        _raise_first_bad_line(path)
        raise ValueError(f"data file {path} could not be read as JSONL: {error}") from error
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if not rows:
        raise ValueError(f"data file {path} is empty")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_number(path, index)}: a row must be a JSON object")
    return rows


def _has_a_row(path: Path) -> bool:
    """Whether any line is not blank; stops at the first, so a big file costs nothing."""
    with path.open(encoding="utf-8") as handle:
        return any(line.strip() for line in handle)


def _raise_first_bad_line(path: Path) -> None:
    """Re-scan with the json module to say which line is broken."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}:{number}: a row must be a JSON object") from None


def line_number(path: Path, row_index: int) -> int:
    """The 1-based line of the row_index-th (0-based) row; blank lines hold no row.

    Only called to word an error, so re-reading the file is fine.
    """
    with path.open(encoding="utf-8") as handle:
        seen = -1
        for number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == row_index:
                    return number
    return row_index + 1
