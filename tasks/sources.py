"""Where a benchmark's rows come from, in a fixed order of preference.

1. A local path the user gives: a directory holding one file per original split
   (`train.jsonl` or `train.csv`, `validation.jsonl` / `val.jsonl` / `dev.jsonl`, ...),
   a directory written by `DatasetDict.save_to_disk`, or a mapping {split: file}.
2. The project's fixtures (`fixtures: true`): a handful of rows per task written for the
   tests and the demo, in the real schema; enough to run, not to measure.
3. `datasets.load_dataset(hf_id, hf_config)`, only where it can work: when the
   environment says the machine is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), only
   `datasets`' own cache is read; otherwise the hub is tried after a two-second
   connection probe, so a machine without network fails at once instead of retrying.
4. Otherwise a TaskError that says where to put which files with which fields.

Rows keep the dataset's own schema (the Hugging Face field names), whatever the source,
so a task reads one schema. A dataset may call an original split by a name of its own
(`own_name`: MNLI's "validation_matched", TREC's "test" as the split test is drawn from);
the hub is asked for that name, and local files and saved splits of that name are tried
before the generic ones, so a local copy of the whole dataset reads as the hub would.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.base import TaskError
from tasks.jsonl import ROW_FORMATS, Rows, read_rows

FIXTURES_DIR = Path(__file__).parent / "data" / "fixtures"
ORIGINAL_SPLITS = ("train", "validation")
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    # SuperGLUE's own download calls it val, GLUE-style dumps dev.
    "validation": ("validation", "val", "dev"),
}
HUB_HOST = ("huggingface.co", 443)
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

LocalPath = str | Path | Mapping[str, str | Path]


def load_split(
    task_name: str,
    split: str,
    path: LocalPath | None = None,
    *,
    fixtures: bool = False,
    hf_id: str | None = None,
    hf_config: str | None = None,
    hub: bool = True,
    schema: Sequence[str] = (),
    own_name: str | None = None,
) -> Rows:
    """The rows of an original split ("train" or "validation") of a task's dataset.

    `own_name` is the dataset's name for that split where it has another (module doc).
    `schema` (the fields the task reads) only words the error when no source has data.
    """
    if split not in ORIGINAL_SPLITS:
        raise TaskError(f"task {task_name!r}: split {split!r} is not one of {ORIGINAL_SPLITS}")
    if path is not None and fixtures:
        raise TaskError(f"task {task_name!r}: give `path` or `fixtures: true`, not both")
    names = split_names(split, own_name)
    if fixtures:
        path = FIXTURES_DIR / task_name
    if path is not None:
        return _local(task_name, split, path, schema, names)
    problem = "no `path` given"
    if hub and hf_id is not None:
        problem = _hub_problem()
        if problem is None:
            rows, problem = _from_hub(hf_id, hf_config, names[0])
            if rows is not None:
                return rows
    raise TaskError(_nothing_found(task_name, split, problem, hf_id, hf_config, schema))


def split_names(split: str, own_name: str | None = None) -> tuple[str, ...]:
    """The names an original split may go by, the dataset's own first."""
    return tuple(dict.fromkeys(((own_name,) if own_name else ()) + SPLIT_NAMES[split]))


# ------------------------------------------------------------------------------ local


def _local(
    task_name: str, split: str, path: LocalPath, schema: Sequence[str], names: Sequence[str]
) -> Rows:
    context = f"task {task_name!r} split {split!r}"
    if isinstance(path, Mapping):
        found = [name for name in names if name in path]
        if not found:
            raise TaskError(
                f"{context}: `path` maps {sorted(path)}; add {split!r}: FILE "
                f"(.jsonl or .csv with fields {', '.join(schema)})"
            )
        return _read(context, Path(path[found[0]]), schema)
    directory = Path(path)
    if not directory.is_dir():
        raise TaskError(
            f"{context}: `path` {directory} is not a directory; give a directory with "
            f"{split}.jsonl (or .csv) inside, or one written by DatasetDict.save_to_disk"
        )
    if (directory / "dataset_dict.json").is_file():
        return _saved_to_disk(context, directory, names)
    for name in names:
        for suffix in ROW_FORMATS:
            if (directory / f"{name}{suffix}").is_file():
                return _read(context, directory / f"{name}{suffix}", schema)
    tried = ", ".join(f"{name}{suffix}" for name in names for suffix in ROW_FORMATS)
    raise TaskError(
        f"{context}: {directory} holds none of {tried}; put the {split!r} rows there as "
        f"JSONL or CSV with fields {', '.join(schema)}"
    )


def _read(context: str, file: Path, schema: Sequence[str]) -> Rows:
    try:
        return read_rows(file)
    except FileNotFoundError:
        raise TaskError(
            f"{context}: data file {file} not found; expected JSONL or CSV with fields "
            + ", ".join(schema)
        ) from None
    except ValueError as error:  # empty or malformed; the message names the line
        raise TaskError(f"{context}: {error}") from None


def _saved_to_disk(context: str, directory: Path, names: Sequence[str]) -> Rows:
    import datasets  # here: `import tasks` must stay fast

    saved = datasets.load_from_disk(str(directory))
    found = [name for name in names if name in saved]
    if not found:
        raise TaskError(
            f"{context}: the DatasetDict in {directory} has splits {list(saved)}, none of "
            f"{list(names)}"
        )
    rows = saved[found[0]].to_list()
    if not rows:
        raise TaskError(f"{context}: split {found[0]!r} of {directory} is empty")
    return Rows(rows, lambda index: f"{directory} split {found[0]!r} row {index + 1}")


# -------------------------------------------------------------------------------- hub


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in _OFFLINE_VARIABLES
    )


def _hub_problem() -> str | None:
    """Why the hub cannot be used now, or None when it (or the offline cache) may serve."""
    if _offline():
        return None  # datasets reads only its cache; it will say if the data is not there
    try:
        socket.create_connection(HUB_HOST, timeout=2).close()
    except OSError as error:
        return f"the hub ({HUB_HOST[0]}) is unreachable: {error}"
    return None


def _from_hub(hf_id: str, hf_config: str | None, split: str) -> tuple[Rows | None, str]:
    import datasets

    name = hf_id if hf_config is None else f"{hf_id}/{hf_config}"
    try:
        table = datasets.load_dataset(hf_id, hf_config, split=split)
    except Exception as error:  # every failure reads the same to the user: no data
        where = "the offline cache" if _offline() else "the hub"
        return None, f"datasets.load_dataset({name!r}) from {where} failed: {error}"
    rows: list[dict[str, Any]] = table.to_list()
    return Rows(rows, lambda index: f"{name} split {split!r} row {index + 1}"), ""


def _nothing_found(
    task_name: str,
    split: str,
    problem: str,
    hf_id: str | None,
    hf_config: str | None,
    schema: Sequence[str],
) -> str:
    hub = "" if hf_id is None else f" ({hf_id}" + (f", {hf_config})" if hf_config else ")")
    return (
        f"task {task_name!r}: no data for the original {split!r} split ({problem}). Either "
        f"put DIR/{split}.jsonl (or .csv, one row per example, fields "
        f"{', '.join(schema)}: the Hugging Face schema{hub}) and set `path: DIR`, or set "
        "`path` to a directory written by DatasetDict.save_to_disk, or run where "
        "datasets.load_dataset can reach the hub or its cache, or set `fixtures: true` "
        "for the project's few sample rows"
    )
