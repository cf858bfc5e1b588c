"""The tasks shipped with the package: the bundled sentiment data and a user's JSONL files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.base import SPLITS, ClassificationTask
from tasks.registry import register_task

DATA_DIR = Path(__file__).parent / "data"

# MeZO's SST-2 prompt, so zero-shot and fine-tuned numbers read like the papers'.
SENTIMENT_TEMPLATE = "{text} It was"
SENTIMENT_VERBALIZER: dict[int, str] = {0: " terrible", 1: " great"}


@register_task("sentiment")
def sentiment(
    template: str = SENTIMENT_TEMPLATE,
    verbalizer: Mapping[Any, str] | None = None,
    data_dir: str | Path = DATA_DIR / "sentiment",
) -> ClassificationTask:
    """Short English reviews written for this project (0 = negative, 1 = positive)."""
    return ClassificationTask(
        name="sentiment",
        template=template,
        verbalizer=dict(SENTIMENT_VERBALIZER if verbalizer is None else verbalizer),
        data_files=split_files(data_dir),
    )


@register_task("jsonl")
def jsonl(
    path: str | Path | Mapping[str, str | Path],
    template: str,
    verbalizer: Mapping[Any, str],
    label: str = "label",
    name: str = "jsonl",
) -> ClassificationTask:
    """A user's classification task from a config: JSONL file(s), template, verbalizer."""
    return ClassificationTask(
        name=name,
        template=template,
        verbalizer=dict(verbalizer),
        data_files=split_files(path),
        label_field=label,
    )


def split_files(path: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    """Which file holds which split.

    - a mapping `{train: a.jsonl, dev: b.jsonl}`: as given;
    - a pattern with `{split}` (`data/{split}.jsonl`): filled in per split;
    - a directory: `train.jsonl` and `dev.jsonl` inside it;
    - a single file: the train split only (scoring dev on training rows would
      look like success, so there is deliberately no default dev split).
    A missing file is reported when its split is loaded, with the expected format.
    """
    if isinstance(path, Mapping):
        return {str(split): Path(file) for split, file in path.items()}
    text = str(path)
    if "{split}" in text:
        return {split: Path(text.format(split=split)) for split in SPLITS}
    # A path without a suffix is taken as a directory even before it exists, so a typo
    # is reported as "dir/train.jsonl not found" rather than as a file that is missing.
    if Path(text).is_dir() or Path(text).suffix == "":
        return {split: Path(text) / f"{split}.jsonl" for split in SPLITS}
    return {"train": Path(text)}
