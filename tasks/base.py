"""What a task is: examples, a prompt per example, and the candidates it is scored on.

A task knows text, not models: `tasks.scoring` turns (prompt, candidates) into token
batches and scores. `ClassificationTask` covers every "template + verbalizer" task, the
bundled one and a user's own JSONL file alike, so a new classification task is data,
not code.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.jsonl import line_number, read_jsonl

SPLITS = ("train", "dev")


class TaskError(ValueError):
    """A task is misconfigured or its data is malformed; the message says where and why."""


@dataclass(frozen=True)
class Example:
    """One row of a task. `label` is the index of the gold candidate, not the raw label."""

    # hash=False: a dict cannot be hashed; uid and label identify the example well enough.
    fields: dict[str, Any] = field(hash=False)
    label: int
    uid: str


class Task(ABC):
    """The interface the training loop and evaluation rely on."""

    name: str

    @abstractmethod
    def load(self, split: str) -> list[Example]:
        """The examples of a split ("train" or "dev"), in file order."""

    @abstractmethod
    def prompt(self, example: Example) -> str:
        """The text the model reads before a candidate."""

    @abstractmethod
    def candidates(self, example: Example) -> list[str]:
        """The continuations to score; `example.label` indexes the gold one."""


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


@dataclass
class ClassificationTask(Task):
    """A template with `{field}` placeholders plus a verbalizer, over JSONL files.

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
    _fields: list[str] = field(init=False, repr=False, compare=False)
    _label_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _cache: dict[str, list[Example]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._fields = template_fields(self.template)
        if not self._fields:
            raise TaskError(
                f"task {self.name!r}: template {self.template!r} has no {{field}} placeholder"
            )
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
        # labels may be either; both should mean the same label.
        self._label_index = {str(key): i for i, key in enumerate(self.verbalizer)}
        if len(self._label_index) != len(self.verbalizer):
            raise TaskError(f"task {self.name!r}: verbalizer keys collide as strings")

    @property
    def expected_format(self) -> str:
        fields = ", ".join([*self._fields, self.label_field])
        labels = ", ".join(repr(key) for key in self.verbalizer)
        return (
            f"JSONL, one object per line with fields {fields} ({self.label_field} one of {labels})"
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
            rows = read_jsonl(path)
        except FileNotFoundError:
            raise TaskError(
                f"{context}: data file {path} not found; expected {self.expected_format}"
            ) from None
        except ValueError as error:  # empty or not JSON; the message names path and line
            raise TaskError(f"{context}: {error}; expected {self.expected_format}") from None
        return [self._example(row, index, path, split) for index, row in enumerate(rows)]

    def _example(self, row: dict[str, Any], index: int, path: Path, split: str) -> Example:
        def where() -> str:
            return f"{path}:{line_number(path, index)} (row {index + 1})"

        for name in [*self._fields, self.label_field]:
            # datasets fills a key absent from one row with None, so None means missing.
            if row.get(name) is None:
                raise TaskError(
                    f"{where()}: field {name!r} is missing; the template {self.template!r} "
                    f"and label field need {[*self._fields, self.label_field]}; "
                    f"the row has {sorted(k for k, v in row.items() if v is not None)}"
                )
        value = row[self.label_field]
        label = self._label_index.get(str(value))
        if label is None:
            raise TaskError(
                f"{where()}: label {value!r} is not in the verbalizer; "
                f"expected one of {list(self.verbalizer)}"
            )
        uid = str(row.get("uid", row.get("id", f"{split}-{index}")))
        return Example(fields=dict(row), label=label, uid=uid)

    def prompt(self, example: Example) -> str:
        try:
            return self.template.format_map(example.fields)
        except KeyError as error:  # an Example built by hand, not by load()
            raise TaskError(
                f"task {self.name!r}: example {example.uid!r} lacks field {error.args[0]!r} "
                f"used by the template {self.template!r}"
            ) from None

    def candidates(self, example: Example) -> list[str]:
        return list(self.verbalizer.values())
