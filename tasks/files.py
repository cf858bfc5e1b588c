"""A user's own task over local files: a template over JSONL/CSV rows, one file per split.

Which file holds which split (`split_files`):

- a mapping `{train: a.jsonl, dev: b.csv}` (`validation:` is read as `dev:`);
- a pattern with `{split}` (`data/{split}.jsonl`): filled in with train, dev and test; the
  dev split reads `data/validation.jsonl` when there is no `data/dev.jsonl`;
- a directory: `train.jsonl` (or `.csv`), `dev...` or `validation...` (the Hugging Face
  datasets' name of the split), and `test...` inside it;
- a single file: the train split only. Scoring dev on training rows would look like
  success, so there is no default dev split; `dev_fraction` holds out a seeded part of
  the training file instead (stratified by label for classification), which is an error
  beside a dev file of its own.

A missing file is reported when its split is loaded, with the expected format; a dev and
a validation file side by side are refused (which one is the dev split?).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tasks.base import OBJECTIVES, SPLITS, Example, Task, TaskError, check_choice, template_fields
from tasks.jsonl import ROW_FORMATS, Rows, read_rows
from tasks.sampling import permutation

DEV_NAMES = ("dev", "validation")
"""The names a dev split's file goes by: ours, then the Hugging Face datasets' one."""


@dataclass(kw_only=True)
class FileTask(Task):
    """A template over local JSONL/CSV files, one file per split, read once per split.

    Subclasses declare their own leading fields (`name`, `data_files`, a `template`: in the
    order their callers give them) and say which fields a row needs and how a row becomes
    an Example; the options every file task shares are here, keyword-only.
    """

    objective: str = "loss"
    """What training minimises: one of OBJECTIVES."""
    dev_fraction: float | None = None
    """Hold out this share of the train file as the dev split (classification: stratified
    by label)."""
    split_seed: int = 0
    """Which rows `dev_fraction` holds out."""
    _fields: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    _cache: dict[str, list[Example]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _check_held_out(self) -> None:
        """`dev_fraction`: a fraction in (0, 1), and no dev file beside it."""
        if self.dev_fraction is None:
            return
        fraction = self.dev_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0 < fraction < 1
        ):
            raise TaskError(
                f"task {self.name!r}: dev_fraction must be a number between 0 and 1 "
                f"(the share of the training file held out for dev), got {fraction!r}"
            )
        if "dev" in self.data_files:
            raise TaskError(
                f"task {self.name!r}: dev_fraction={fraction} holds out part of the training "
                f"file as the dev split, but the dev split has a file of its own: "
                f"{self.data_files['dev']}; drop dev_fraction or that file"
            )
        if "train" not in self.data_files:
            raise TaskError(f"task {self.name!r}: dev_fraction needs a train file to hold out from")

    def _stratum(self, example: Example) -> Hashable:
        """What a held-out dev split keeps in proportion (classification: the label)."""
        return None

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
        if self.dev_fraction is not None and split in ("train", "dev"):
            if split not in self._cache:
                examples = self._read("train", Path(self.data_files["train"]))
                where = (
                    f"task {self.name!r}: dev_fraction={self.dev_fraction} of {len(examples)} rows"
                )
                self._cache["train"], self._cache["dev"] = hold_out(
                    examples, self.dev_fraction, self.split_seed, self._stratum, where
                )
            return list(self._cache[split])
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
class ClassificationTask(FileTask):
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
    metric: str = "accuracy"
    """The evaluation metric, a name in `tasks.metrics.METRICS`."""
    kind: ClassVar[str] = "classification"
    _label_index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_template()
        self._check_held_out()
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

    def _stratum(self, example: Example) -> Hashable:
        return example.label


@dataclass
class GenerationTask(FileTask):
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
    metric: str = "squad_f1"
    """The evaluation metric, a name in `tasks.metrics.METRICS`."""
    kind: ClassVar[str] = "generation"

    def __post_init__(self) -> None:
        self._check_template()
        self._check_held_out()

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


def hold_out(
    examples: Sequence[Example],
    fraction: float,
    seed: int,
    stratum: Callable[[Example], Hashable],
    where: str,
) -> tuple[list[Example], list[Example]]:
    """(train, dev): `fraction` of each stratum's examples, rounded half up, drawn in the
    `seed` order (`tasks.sampling.permutation`), go to dev; both keep the file's order."""
    strata: dict[Hashable, list[int]] = {}
    for index, example in enumerate(examples):
        strata.setdefault(stratum(example), []).append(index)
    held: set[int] = set()
    for members in strata.values():
        take = math.floor(fraction * len(members) + 0.5)
        held.update(members[i] for i in permutation(len(members), seed)[:take])
    train = [e for i, e in enumerate(examples) if i not in held]
    dev = [e for i, e in enumerate(examples) if i in held]
    if not train or not dev:
        raise TaskError(
            f"{where} leaves {len(train)} for train and {len(dev)} for dev; both need at "
            "least one: choose another fraction or give a dev file"
        )
    return train, dev


def split_files(
    path: str | Path | Mapping[str, str | Path], hold_out_dev: bool = False
) -> dict[str, Path]:
    """Which file holds which split (the module doc lists the forms).

    `hold_out_dev` (the task's `dev_fraction`): a directory or pattern without a dev file
    has no dev entry, as the dev split is held out of train; a dev file that exists stays,
    and the task refuses the pair, naming it.
    """
    if isinstance(path, Mapping):
        files = {str(split): Path(file) for split, file in path.items()}
        if "validation" in files:
            if "dev" in files:
                raise TaskError(
                    f"both dev ({files['dev']}) and validation ({files['validation']}) are "
                    "given; validation is the dev split's other name: keep one"
                )
            files["dev"] = files.pop("validation")
        return files
    text = str(path)
    if "{split}" in text:
        files = {
            split: _split_file(
                split, {name: [Path(text.format(split=name))] for name in _names(split)}
            )
            for split in SPLITS
        }
    # A path without a suffix is taken as a directory even before it exists, so a typo
    # is reported as "dir/train.jsonl not found" rather than as a file that is missing.
    elif Path(text).is_dir() or Path(text).suffix == "":
        directory = Path(text)
        files = {
            split: _split_file(
                split,
                {
                    name: [directory / f"{name}{suffix}" for suffix in ROW_FORMATS]
                    for name in _names(split)
                },
            )
            for split in SPLITS
        }
    else:
        return {"train": Path(text)}
    if hold_out_dev and not files["dev"].is_file():
        del files["dev"]
    return files


def _names(split: str) -> tuple[str, ...]:
    return DEV_NAMES if split == "dev" else (split,)


def _split_file(split: str, candidates: Mapping[str, Sequence[Path]]) -> Path:
    """The file of a split, from its candidates per name (`dev`, `validation`), each in
    ROW_FORMATS order (JSONL before CSV); the first candidate where none exists. Files
    under two names of one split are refused: which one is it?"""
    found = {
        name: next((path for path in paths if path.is_file()), None)
        for name, paths in candidates.items()
    }
    present = [path for path in found.values() if path is not None]
    if len(present) > 1:
        raise TaskError(
            f"the {split} split has two files, {present[0]} and {present[1]} ("
            + " and ".join(candidates)
            + " name the same split); keep one"
        )
    return present[0] if present else next(iter(candidates.values()))[0]
