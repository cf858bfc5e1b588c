"""What a task is: examples, a prompt per example, and what the model is scored on.

A task knows text, not models: `tasks.scoring` and `tasks.generation` turn prompts and
continuations into token batches. Three kinds of task share one interface:

- "classification": a fixed candidate set (a verbalizer); the loss is cross-entropy over
  the candidates' length-normalised log-likelihoods, the prediction their argmax.
- "multiple_choice": candidates that differ per example (COPA's two choices, ReCoRD's
  entities); trained by teacher forcing on the gold candidate's tokens only (as MeZO
  trains COPA and ReCoRD), evaluated by the argmax of the candidates' log-likelihoods.
- "generation": a free-form answer; trained by teacher forcing on the first gold answer,
  evaluated by greedy decoding scored with SQuAD-style F1/EM against every gold answer.

`ClassificationTask` and `GenerationTask` cover a user's own task over local JSONL/CSV
files, so a new task of either kind is a config, not code.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tasks.jsonl import Rows, read_rows

SPLITS = ("train", "dev", "test")
KINDS = ("classification", "multiple_choice", "generation")
OBJECTIVES = ("loss", "f1", "accuracy")
"""What a training closure returns: the kind's differentiable loss, or minus a metric
(ZO needs no gradient of its objective, so `-F1` on decoded answers is a valid target)."""


class TaskError(ValueError):
    """A task is misconfigured or its data is malformed; the message says where and why."""


@dataclass(frozen=True)
class Example:
    """One row of a task.

    `label` is the index of the gold candidate (0 for generation tasks). `group` ties
    rows scored together: the MultiRC question an answer option belongs to, the ReCoRD
    query. `answers` holds the gold answer texts, raw (no leading space), for the tasks
    whose metric compares text: every gold answer of a generation task, ReCoRD's gold
    entities. Everything else about the row stays in `fields`, in the data's own schema.
    """

    # hash=False: a dict cannot be hashed; uid and label identify the example well enough.
    fields: dict[str, Any] = field(hash=False)
    label: int
    uid: str
    group: str | None = None
    answers: tuple[str, ...] = ()


MASK = "<mask>"
"""Where a masked-LM template puts the mask; scoring reads the verbalizer word there (and
writes the tokenizer's own mask token in its place, should that be spelled otherwise)."""


@dataclass(frozen=True)
class MaskedPrompt:
    """An example as a masked LM reads it: a prompt with one MASK inside it, and the
    words read at that mask, one per candidate in the candidates' order (each a single
    token of the model's vocabulary, with the leading space RoBERTa's BPE gives a word)."""

    prompt: str
    candidates: tuple[str, ...]


class Task(ABC):
    """The interface the training loop, scoring and evaluation rely on.

    `kind` is one of KINDS, `metric` names a function in `tasks.metrics.METRICS`, and
    `objective` (one of OBJECTIVES, "loss" by default) says what training minimises.
    """

    name: str
    kind: str = "classification"
    metric: str = "accuracy"
    objective: str = "loss"
    answer_prefix: str = " "
    """Generation tasks: put before each gold answer to make it a continuation of the
    prompt ("Answer:" + " Denver"), as candidates carry their own leading space."""

    @abstractmethod
    def load(self, split: str) -> list[Example]:
        """The examples of a split ("train", "dev" or "test"), in a fixed order."""

    @abstractmethod
    def prompt(self, example: Example) -> str:
        """The text the model reads before a candidate or an answer."""

    def candidates(self, example: Example) -> list[str]:
        """The continuations to score (classification and multiple choice), each exactly
        as appended after the prompt; `example.label` indexes the gold one."""
        raise TaskError(f"task {self.name!r} is a {self.kind} task; it has no candidates")

    def masked_form(self, example: Example) -> MaskedPrompt | None:
        """The example's own masked-LM prompt (LM-BFF's templates put the mask inside the
        sentence: "<text> It was<mask>."), which a masked LM reads instead of `prompt` and
        `candidates`; None: a masked LM reads `prompt` with a mask appended."""
        return None

    # Optional: `candidate_prompts(example) -> list[str]`, one prompt per candidate, for
    # tasks whose candidates differ in what precedes a shared continuation (WinoGrande's
    # partial scoring: the option fills the blank, the rest of the sentence is scored).
    # Scoring then reads each candidate after its own prompt (`tasks.scoring.rows_of`).

    def answers(self, example: Example) -> list[str]:
        """Generation: every gold answer as a continuation of the prompt (with
        `answer_prefix`); the first is the teacher-forcing target. Other kinds: the gold
        answer texts the metric compares with (ReCoRD's entities), else the gold candidate.
        """
        if self.kind == "generation":
            if not example.answers:
                raise TaskError(f"task {self.name!r}: example {example.uid!r} has no answer")
            return [self.answer_prefix + answer for answer in example.answers]
        if example.answers:
            return list(example.answers)
        return [self.candidates(example)[example.label]]


def check_choice(what: str, value: object, choices: Sequence[str]) -> str:
    """`value` if it is one of `choices`, else a TaskError listing them."""
    if value not in choices:
        raise TaskError(f"{what} {value!r} is not one of {list(choices)}")
    return str(value)


def template_fields(template: str) -> list[str]:
    """The `{field}` names a template uses, in order of first use."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:  # an unbalanced brace
        raise TaskError(f"template {template!r} is malformed: {error}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        # Only plain names: attribute/index access would hide a missing field behind a
        # KeyError/AttributeError raised from inside str.format.
        if not name.isidentifier():
            raise TaskError(
                f"template {template!r}: placeholder {{{name}}} must be a plain field name "
                "such as {text}"
            )
        if name not in names:
            names.append(name)
    return names


class _TemplateFileTask(Task):
    """A template over local JSONL/CSV files, one file per split, read once per split.

    Subclasses say which fields a row needs and how a row becomes an Example.
    """

    name: str
    template: str
    data_files: Mapping[str, str | Path]
    _fields: list[str]
    _cache: dict[str, list[Example]]

    def _check_template(self) -> None:
        if not isinstance(self.template, str):  # `template: {text}` is a YAML mapping
            raise TaskError(
                f"task {self.name!r}: template must be text, got {self.template!r}; quote it "
                '(template: "{text}")'
            )
        self._fields = template_fields(self.template)
        if not self._fields:
            raise TaskError(
                f"task {self.name!r}: template {self.template!r} has no {{field}} placeholder"
            )
        self.objective = check_choice(f"task {self.name!r}: objective", self.objective, OBJECTIVES)

    @property
    def required_fields(self) -> list[str]:
        return list(self._fields)

    @property
    def expected_format(self) -> str:
        return "JSONL (one object per line) or CSV (a header row), with fields " + ", ".join(
            self.required_fields
        )

    def load(self, split: str) -> list[Example]:
        if split not in self.data_files:
            raise TaskError(
                f"task {self.name!r} has no {split!r} split; it has {sorted(self.data_files)}"
            )
        if split not in self._cache:
            # Loaded once per task object: the training loop and evaluation both ask.
            self._cache[split] = self._read(split, Path(self.data_files[split]))
        return list(self._cache[split])

    def _read(self, split: str, path: Path) -> list[Example]:
        context = f"task {self.name!r} split {split!r}"
        try:
            rows = read_rows(path)
        except FileNotFoundError:
            raise TaskError(
                f"{context}: data file {path} not found; expected {self.expected_format}"
            ) from None
        except ValueError as error:  # empty or malformed; the message names path and line
            raise TaskError(f"{context}: {error}; expected {self.expected_format}") from None
        return [self._checked(rows, index, split) for index in range(len(rows))]

    def _checked(self, rows: Rows, index: int, split: str) -> Example:
        row = rows[index]
        for name in self.required_fields:
            # datasets fills a key absent from one row with None, so None means missing.
            if row.get(name) is None:
                raise TaskError(
                    f"{rows.where(index)}: field {name!r} is missing; the template "
                    f"{self.template!r} and the task need {self.required_fields}; "
                    f"the row has {sorted(k for k, v in row.items() if v is not None)}"
                )
        uid = str(row.get("uid", row.get("id", f"{split}-{index}")))
        return self._example(row, uid, rows.where(index))

    def _example(self, row: dict[str, Any], uid: str, where: str) -> Example:
        raise NotImplementedError

    def prompt(self, example: Example) -> str:
        try:
            return self.template.format_map(example.fields)
        except KeyError as error:  # an Example built by hand, not by load()
            raise TaskError(
                f"task {self.name!r}: example {example.uid!r} lacks field {error.args[0]!r} "
                f"used by the template {self.template!r}"
            ) from None


@dataclass
class ClassificationTask(_TemplateFileTask):
    """A template with `{field}` placeholders plus a verbalizer, over JSONL/CSV files.

    `verbalizer` maps a label value, as it appears in the data, to the candidate string
    (mind the leading space: " great" is one word after "It was", "great" is glued to it).
    Candidates are the verbalizer's values in its order, so `Example.label` is the
    position of the row's label among the verbalizer's keys.
    """

    name: str
    template: str
    verbalizer: Mapping[Any, str]
    data_files: Mapping[str, str | Path]
    label_field: str = "label"
    """The row field holding the label (a key of the verbalizer)."""
    objective: str = "loss"
    """What training minimises: one of OBJECTIVES."""
    metric: str = "accuracy"
    """The evaluation metric, a name in `tasks.metrics.METRICS`."""
    kind: ClassVar[str] = "classification"
    _fields: list[str] = field(init=False, repr=False, compare=False)
    _label_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _cache: dict[str, list[Example]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._check_template()
        if len(self.verbalizer) < 2:
            raise TaskError(
                f"task {self.name!r}: the verbalizer needs at least two labels, got "
                f"{dict(self.verbalizer)!r}"
            )
        words = list(self.verbalizer.values())
        if any(not isinstance(word, str) or not word for word in words):
            raise TaskError(f"task {self.name!r}: verbalizer values must be non-empty strings")
        if len(set(words)) != len(words):
            raise TaskError(f"task {self.name!r}: two labels share a verbalizer string {words}")
        # Keys compare as strings: YAML gives `1:` as an int and `"1":` as a str, JSON
        # labels may be either, CSV labels are always text; all should mean the same label.
        self._label_index = {str(key): i for i, key in enumerate(self.verbalizer)}
        if len(self._label_index) != len(self.verbalizer):
            raise TaskError(f"task {self.name!r}: verbalizer keys collide as strings")

    @property
    def required_fields(self) -> list[str]:
        return [*self._fields, self.label_field]

    @property
    def expected_format(self) -> str:
        labels = ", ".join(repr(key) for key in self.verbalizer)
        return f"{super().expected_format} ({self.label_field} one of {labels})"

    def _example(self, row: dict[str, Any], uid: str, where: str) -> Example:
        value = row[self.label_field]
        label = self._label_index.get(str(value))
        if label is None:
            raise TaskError(
                f"{where}: label {value!r} is not in the verbalizer; "
                f"expected one of {list(self.verbalizer)}"
            )
        return Example(fields=dict(row), label=label, uid=uid)

    def candidates(self, example: Example) -> list[str]:
        return list(self.verbalizer.values())


@dataclass
class GenerationTask(_TemplateFileTask):
    """A template plus a target field, over JSONL/CSV files: free-form answers.

    The target field holds one answer (a string) or several (a JSON list of strings, all
    accepted by the metric; the first is the training target). `answer_prefix` joins the
    answer to the prompt, like a candidate's leading space.
    """

    name: str
    template: str
    data_files: Mapping[str, str | Path]
    target_field: str = "target"
    """The row field holding the gold answer(s)."""
    answer_prefix: str = " "
    """Put between the prompt and an answer when training on it."""
    objective: str = "loss"
    """What training minimises: one of OBJECTIVES."""
    metric: str = "squad_f1"
    """The evaluation metric, a name in `tasks.metrics.METRICS`."""
    kind: ClassVar[str] = "generation"
    _fields: list[str] = field(init=False, repr=False, compare=False)
    _cache: dict[str, list[Example]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._check_template()

    @property
    def required_fields(self) -> list[str]:
        return [*self._fields, self.target_field]

    @property
    def expected_format(self) -> str:
        return f"{super().expected_format} ({self.target_field} a string or a list of strings)"

    def _example(self, row: dict[str, Any], uid: str, where: str) -> Example:
        value = row[self.target_field]
        answers = [value] if isinstance(value, str) else value
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)
        ):
            raise TaskError(
                f"{where}: target {self.target_field!r} must be a non-empty string or a "
                f"non-empty list of non-empty strings, got {value!r}"
            )
        return Example(fields=dict(row), label=0, uid=uid, answers=tuple(answers))
