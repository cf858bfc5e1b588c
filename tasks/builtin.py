"""The tasks shipped with the package: the bundled sentiment data, a user's own files, and
(by importing `tasks.chat` and `tasks.suite`) chat / instruction rows and the MeZO /
ZO-Bench benchmark suite."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import chat as _chat  # noqa: F401  (registers chat)
from tasks import suite as _suite  # noqa: F401  (registers sst2, rte, ..., winogrande)
from tasks.base import Task, TaskError
from tasks.files import ClassificationTask, GenerationTask, split_files
from tasks.metrics import check_metric
from tasks.registry import register_task

DATA_DIR = Path(__file__).parent / "data"

# MeZO's SST-2 prompt, so zero-shot and fine-tuned numbers read like the papers'.
SENTIMENT_TEMPLATE = "{text} It was"
SENTIMENT_VERBALIZER: dict[int, str] = {0: " terrible", 1: " great"}


def _mapping(task: str, verbalizer: object) -> dict[Any, str]:
    if not isinstance(verbalizer, Mapping):
        raise TaskError(
            f"task {task!r}: verbalizer must map each label to its text (e.g. "
            f"{{0: ' terrible', 1: ' great'}}), got {verbalizer!r}"
        )
    return dict(verbalizer)


def _added_to(task: str, builtin: Mapping[int, str], given: object) -> dict[int, str]:
    """The task's own verbalizer with ``given``'s entries changed or added, so that
    ``task.verbalizer.2=" okay"`` adds a label and ``task.verbalizer.1=" good"`` changes one
    while the others keep their words. Labels are integers: ``"1"`` (an override's key) is
    label 1."""
    merged = dict(builtin)
    for key, word in _mapping(task, given).items():
        text = str(key).strip()
        if isinstance(key, bool) or not text.lstrip("-").isdigit():
            raise TaskError(
                f"task {task!r}: verbalizer key {key!r} is not a label; its labels are "
                f"integers ({', '.join(f'{k}:{w!r}' for k, w in builtin.items())}): e.g. "
                f"task.verbalizer.{len(builtin)}=' okay' adds label {len(builtin)}"
            )
        merged[int(text)] = word
    return merged


@dataclass(frozen=True)
class SentimentOptions:
    """Short English reviews written for this project (0 = negative, 1 = positive)."""

    template: str = SENTIMENT_TEMPLATE
    verbalizer: Mapping[Any, str] | None = None
    """Label -> candidate, changing or adding entries of MeZO's " terrible" / " great"."""
    data_dir: str | Path = DATA_DIR / "sentiment"
    objective: str = "loss"


def sentiment(options: SentimentOptions) -> ClassificationTask:
    verbalizer = _added_to("sentiment", SENTIMENT_VERBALIZER, options.verbalizer or {})
    return ClassificationTask(
        name="sentiment",
        template=options.template,
        verbalizer=verbalizer,
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
    dev_fraction: float | None = None
    """Hold out this share of a single training file as the dev split (seeded by
    `split_seed`; stratified by label for classification); an error beside a dev file."""
    split_seed: int = 0


def jsonl(options: JsonlOptions) -> Task:
    name, verbalizer, target = options.name, options.verbalizer, options.target
    if (verbalizer is None) == (target is None):
        raise TaskError(
            f"task {name!r}: give either `verbalizer` (a classification task) or `target` "
            "(a generation task: the field holding the answer), not "
            + ("both" if target is not None else "neither")
        )
    shared = dict(
        name=name,
        template=options.template,
        data_files=split_files(options.path, hold_out_dev=options.dev_fraction is not None),
        objective=options.objective,
        dev_fraction=options.dev_fraction,
        split_seed=options.split_seed,
    )
    if target is not None:
        return GenerationTask(
            **shared,
            target_field=target,
            answer_prefix=options.answer_prefix,
            metric=check_metric(options.metric or "squad_f1"),
        )
    return ClassificationTask(
        **shared,
        verbalizer=_mapping(name, verbalizer or {}),
        label_field=options.label,
        metric=check_metric(options.metric or "accuracy"),
    )


register_task("sentiment", SentimentOptions, sentiment, kinds=("classification",), fixtures=False)
register_task("jsonl", JsonlOptions, jsonl, kinds=("classification", "generation"), fixtures=False)
