"""Reading local row files (JSONL, CSV) with the file:line of every row at hand.

Both go through the standard library, so every value stays what the file says. JSONL
does not go through `datasets.load_dataset("json")`: where a column mixes types (a
list of answers in one row, one answer in the next) its pandas fallback turns the JSON
string "4" into the number 4; and it would write an Arrow copy of every file into the
`datasets` cache. CSV goes through the `csv` module: every value stays the text it is
in the file (no type guessing: a label "01" stays "01"), and the reader knows each row's
line, which a multi-line quoted cell would otherwise make hard to recover.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROW_FORMATS = (".jsonl", ".csv")


@dataclass(frozen=True)
class Rows(Sequence[dict[str, Any]]):
    """Rows of one source and where each came from, to name it in an error message."""

    rows: list[dict[str, Any]]
    locate: Callable[[int], str]
    """Row index -> its place, e.g. "data/train.jsonl:12 (row 11)"."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return self.rows[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def where(self, index: int) -> str:
        return self.locate(index)


def read_rows(path: str | Path) -> Rows:
    """The rows of a .jsonl or .csv file (chosen by suffix; anything else reads as JSONL).

    Raises FileNotFoundError for a missing file and ValueError (naming the path, and the
    line for a bad one) for an empty or malformed file.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        rows, lines = read_csv(path)
        return Rows(rows, lambda index: f"{path}:{lines[index]} (row {index + 1})")
    rows = read_jsonl(path)
    return Rows(rows, lambda index: f"{path}:{line_number(path, index)} (row {index + 1})")


def read_csv(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a CSV file with a header row, and the line each row ends on.

    A cell missing from a short row is None (missing), never "".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(str(path))
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with io.StringIO(_utf8_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            if not reader.fieldnames:
                raise ValueError(f"data file {path} is empty")
            for row in reader:
                if None in row:  # DictReader files surplus cells under the key None
                    raise ValueError(
                        f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells "
                        f"but the header names {len(reader.fieldnames)} columns"
                    )
                rows.append(dict(row))
                lines.append(reader.line_num)
        except csv.Error as error:
            raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None
    if not rows:
        raise ValueError(f"data file {path} is empty (a header and no rows)")
    return rows, lines


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file, in order, each value exactly as the JSON has it.

    Raises FileNotFoundError for a missing file and ValueError (naming the path, and the
    line for a bad one) for an empty or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(str(path))
    rows = []
    with io.StringIO(_utf8_text(path), newline=None) as handle:  # newlines as open() reads them
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}:{number}: a row must be a JSON object")
            rows.append(value)
    if not rows:
        raise ValueError(f"data file {path} is empty")
    return rows


def _utf8_text(path: Path) -> str:
    """The whole file as text; a byte that is not UTF-8 is named by its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        number = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{number}: not UTF-8 text (byte {data[error.start]:#04x} at column "
            f"{error.start - line_start + 1}); save the file as UTF-8"
        ) from None


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
