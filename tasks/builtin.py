"""The tasks shipped with the package: the bundled sentiment data, a user's own files, and
(by importing `tasks.suite`) the MeZO / ZO-Bench benchmark suite."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import suite as _suite  # noqa: F401  (registers sst2, rte, ..., winogrande)
from tasks.base import SPLITS, ClassificationTask, GenerationTask, Task, TaskError
from tasks.jsonl import ROW_FORMATS
from tasks.metrics import check_metric
from tasks.registry import register_task

DATA_DIR = Path(__file__).parent / "data"

# MeZO's SST-2 prompt, so zero-shot and fine-tuned numbers read like the papers'.
SENTIMENT_TEMPLATE = "{text} It was"
SENTIMENT_VERBALIZER: dict[int, str] = {0: " terrible", 1: " great"}


@dataclass(frozen=True)
class SentimentOptions:
    """Short English reviews written for this project (0 = negative, 1 = positive)."""

    template: str = SENTIMENT_TEMPLATE
    verbalizer: Mapping[Any, str] | None = None
    """Label -> candidate; None: MeZO's " terrible" / " great"."""
    data_dir: str | Path = DATA_DIR / "sentiment"
    objective: str = "loss"


def sentiment(options: SentimentOptions) -> ClassificationTask:
    verbalizer = SENTIMENT_VERBALIZER if options.verbalizer is None else options.verbalizer
    return ClassificationTask(
        name="sentiment",
        template=options.template,
        verbalizer=dict(verbalizer),
        data_files=split_files(options.data_dir),
        objective=options.objective,
    )


@dataclass(frozen=True)
class JsonlOptions:
    """A user's own task from a config: JSONL or CSV file(s) and a template, plus either

    - `verbalizer` (label value -> candidate string) and `label` (the label field): a
      classification task, scored by accuracy; or
    - `target` (the field holding the gold answer, or a list of them): a generation task,
      trained by teacher forcing on the answer and scored by SQuAD-style F1.
    """

    path: str | Path | Mapping[str, str | Path]
    template: str
    verbalizer: Mapping[Any, str] | None = None
    label: str = "label"
    target: str | None = None
    name: str = "jsonl"
    objective: str = "loss"
    metric: str | None = None
    answer_prefix: str = " "


def jsonl(options: JsonlOptions) -> Task:
    name, verbalizer, target = options.name, options.verbalizer, options.target
    if (verbalizer is None) == (target is None):
        raise TaskError(
            f"task {name!r}: give either `verbalizer` (a classification task) or `target` "
            "(a generation task: the field holding the answer), not "
            + ("both" if target is not None else "neither")
        )
    files = split_files(options.path)
    if target is not None:
        return GenerationTask(
            name=name,
            template=options.template,
            data_files=files,
            target_field=target,
            answer_prefix=options.answer_prefix,
            objective=options.objective,
            metric=check_metric(options.metric or "squad_f1"),
        )
    return ClassificationTask(
        name=name,
        template=options.template,
        verbalizer=dict(verbalizer or {}),
        data_files=files,
        label_field=options.label,
        objective=options.objective,
        metric=check_metric(options.metric or "accuracy"),
    )


def split_files(path: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    """Which file holds which split.

    - a mapping `{train: a.jsonl, dev: b.csv}`: as given;
    - a pattern with `{split}` (`data/{split}.jsonl`): filled in per split;
    - a directory: `train.jsonl` (or `train.csv`), `dev...` and `test...` inside it;
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
        return {split: _split_file(Path(text), split) for split in SPLITS}
    return {"train": Path(text)}


def _split_file(directory: Path, split: str) -> Path:
    """`split.jsonl` or `split.csv`, whichever exists (JSONL first); JSONL if neither."""
    for suffix in ROW_FORMATS:
        if (directory / f"{split}{suffix}").is_file():
            return directory / f"{split}{suffix}"
    return directory / f"{split}{ROW_FORMATS[0]}"


register_task("sentiment", SentimentOptions, sentiment, kinds=("classification",), fixtures=False)
register_task("jsonl", JsonlOptions, jsonl, kinds=("classification", "generation"), fixtures=False)
