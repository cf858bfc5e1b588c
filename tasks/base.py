"""What a task is: examples, a prompt per example, and what the model is scored on.

A task knows text, not models: `tasks.encoding` and `tasks.generation` turn prompts and
continuations into token batches. Three kinds of task share one interface:

- "classification": a fixed candidate set (a verbalizer); the loss is cross-entropy over
  the candidates' length-normalised log-likelihoods, the prediction their argmax.
- "multiple_choice": candidates that differ per example (COPA's two choices, ReCoRD's
  entities); trained by teacher forcing on the gold candidate's tokens only (as MeZO
  trains COPA and ReCoRD), evaluated by the argmax of the candidates' log-likelihoods.
- "generation": a free-form answer; trained by teacher forcing on the first gold answer,
  evaluated by greedy decoding scored with SQuAD-style F1/EM against every gold answer.

`tasks.files` covers a user's own task over local JSONL/CSV files (`ClassificationTask`,
`GenerationTask`, and `tasks.chat` for chat and instruction rows), so a new task is a
config, not code.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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

    def for_tokenizer(self, tokenizer: Any) -> Task:
        """The task as the model of `tokenizer` reads it: itself, except for a task whose
        text depends on the tokenizer (a chat template, `tasks.chat`). Training batches
        and evaluation call it before they read prompts."""
        return self

    # Optional: `candidate_prompts(example) -> list[str]`, one prompt per candidate, for
    # tasks whose candidates differ in what precedes a shared continuation (WinoGrande's
    # partial scoring: the option fills the blank, the rest of the sentence is scored).
    # Scoring then reads each candidate after its own prompt (`tasks.encoding.rows_of`).

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
