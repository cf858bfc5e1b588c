"""A benchmark task over its dataset's rows (`SuiteTask`, the base of `tasks.suite`): where
the rows come from (`tasks.sources`), MeZO's seeded samples of them (`tasks.sampling`,
or k examples per label), one cache per split, and what the suite's tasks share to read
a row (labels, lists of texts, JSON from CSV) and to show it (stripped text, LM-BFF's
`{field:unpunctuated}` and `{field:lowered}` in masked-LM templates).

Every task takes the same options: where the data is (`path`, `fixtures`, `hub`), how
much of it to sample (`num_train`, `num_dev`, `num_test`, `sample_seed`, `test_seed`)
and what training minimises (`objective`).

A SuiteTask subclass is a dataclass: it is its own options (the `config_class` of its
registration, `tasks.registry`).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tasks.base import OBJECTIVES, SPLITS, Example, MaskedPrompt, Task, TaskError, check_choice
from tasks.jsonl import Rows
from tasks.sampling import ORIGINAL_SPLIT_OF, Sampling, permutation
from tasks.sources import LocalPath, load_split

GLUE = "nyu-mll/glue"
SUPER_GLUE = "aps/super_glue"


class RowError(TaskError):
    """A row cannot become an example; `SuiteTask` adds where the row is."""


@dataclass
class SuiteTask(Task):
    """A benchmark task over its dataset's rows: sources, seeded samples, one cache.

    Subclasses set the class attributes and turn a row into an Example (`example`); the
    prompt and candidates read `Example.fields`, which hold the row as it is.
    """

    path: LocalPath | None = None
    """A directory with train.jsonl / validation.jsonl (or .csv, or a `save_to_disk`
    directory), or {split: file}; rows in the Hugging Face schema."""
    fixtures: bool = False
    """Use the project's few sample rows (tests and demos; too few to measure anything)."""
    hub: bool = True
    """Without `path`: try `datasets.load_dataset` (its cache when HF_HUB_OFFLINE is set)."""
    num_train: int | None = 1000
    num_dev: int | None = 500
    num_test: int | None = 1000
    sample_seed: int = 0
    """Draws train and dev (disjoint, both from the original training split)."""
    test_seed: int = 0
    """Draws test from the original validation split; fixed, so runs share a test set."""
    k_shot: int | None = None
    """Classification, MeZO's k-shot protocol: train and dev each take `k_shot` examples of
    every label (instead of `num_train` / `num_dev`), the first ones of each label in the
    `sample_seed` order of the original training split, train before dev."""
    objective: str = "loss"
    """What training minimises: one of OBJECTIVES."""

    name: ClassVar[str]
    hf_id: ClassVar[str]
    hf_config: ClassVar[str | None] = None
    schema: ClassVar[tuple[str, ...]]
    """The row fields the task reads (besides optional ones)."""
    template: ClassVar[str] = ""
    """The prompt, `{field}` filled with the row's stripped text (tasks that override
    `prompt` need none)."""
    verbalizer: ClassVar[tuple[str, ...]] = ()
    """Classification: the candidate of each label value 0, 1, ... (the dataset's labels)."""
    hf_splits: ClassVar[Mapping[str, str]] = {}
    """The dataset's own name of an original split ("train", "validation") where it has
    another: the split test is drawn from ("validation_matched", "test")."""
    masked_template: ClassVar[str | None] = None
    """The masked-LM prompt, `<mask>` inside it (`tasks.base.MASK`); fields as in
    `template`, plus LM-BFF's variants `{field:unpunctuated}` and `{field:lowered}`."""
    masked_verbalizer: ClassVar[tuple[str, ...]] = ()
    """The words read at the mask, per label; empty: the same as `verbalizer`."""

    _sampling: Sampling = field(init=False, repr=False, compare=False)
    _rows: dict[str, Rows] = field(default_factory=dict, init=False, repr=False, compare=False)
    _source_index: dict[str, list[int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _cache: dict[str, list[Example]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.objective = check_choice(f"task {self.name!r}: objective", self.objective, OBJECTIVES)
        if self.path is not None and self.fixtures:
            raise TaskError(f"task {self.name!r}: give `path` or `fixtures: true`, not both")
        try:
            self._sampling = Sampling(
                self.num_train, self.num_dev, self.num_test, self.sample_seed, self.test_seed
            )
        except TaskError as error:
            raise TaskError(f"task {self.name!r}: {error}") from None
        if self.k_shot is not None:
            if isinstance(self.k_shot, bool) or not isinstance(self.k_shot, int) or self.k_shot < 1:
                raise TaskError(f"task {self.name!r}: k_shot must be a whole number >= 1")
            if self.kind != "classification":
                raise TaskError(
                    f"task {self.name!r} is {self.kind}: k_shot (examples per label) needs a "
                    "classification task; use num_train / num_dev"
                )

    # ------------------------------------------------------------------------ loading

    def load(self, split: str) -> list[Example]:
        check_choice(f"task {self.name!r}: split", split, SPLITS)
        if split not in self._cache:
            if self.k_shot is not None and split != "test":
                self._cache.update(self._k_shot_samples())
            else:
                rows = self.original_rows(ORIGINAL_SPLIT_OF[split])
                indices = self._sampling.indices(split, len(rows))
                original = ORIGINAL_SPLIT_OF[split]
                self._cache[split] = [self._checked(rows, index, original) for index in indices]
        return list(self._cache[split])

    def _k_shot_samples(self) -> dict[str, list[Example]]:
        """`k_shot` examples per label for train, then the next `k_shot` per label for dev,
        in the seeded order of the original training split (fewer where a label runs out)."""
        rows = self.original_rows("train")
        k, labels = self.k_shot or 0, len(self.verbalizer)
        samples: dict[str, list[Example]] = {"train": [], "dev": []}
        counts: dict[str, dict[int, int]] = {"train": {}, "dev": {}}
        for index in permutation(len(rows), self.sample_seed):
            example = self._checked(rows, index, "train")
            for split in ("train", "dev"):
                if counts[split].get(example.label, 0) < k:
                    counts[split][example.label] = counts[split].get(example.label, 0) + 1
                    samples[split].append(example)
                    break
            if all(len(c) == labels and min(c.values()) == k for c in counts.values()):
                break
        return samples

    def original_rows(self, split: str) -> Rows:
        """Every row of an original split ("train" or "validation") that the task keeps
        (`keeps`), read once."""
        if split not in self._rows:
            rows = load_split(
                self.name,
                split,
                self.path,
                fixtures=self.fixtures,
                hf_id=self.hf_id,
                hf_config=self.hf_config,
                hub=self.hub,
                schema=self.schema,
                own_name=self.hf_splits.get(split),
            )
            kept = [index for index, row in enumerate(rows) if self.keeps(row)]
            if len(kept) < len(rows):
                self._source_index[split] = kept
                rows = Rows([rows[i] for i in kept], lambda i, rows=rows: rows.where(kept[i]))
            self._rows[split] = rows
        return self._rows[split]

    def keeps(self, row: dict[str, Any]) -> bool:
        """Whether a row of the source is an example at all (SNLI's unlabelled rows are
        not); dropped rows are never sampled."""
        return True

    def _checked(self, rows: Rows, index: int, original: str) -> Example:
        row = rows[index]
        for name in self.schema:
            # datasets fills a key absent from one row with None, so None means missing.
            if row.get(name) is None:
                present = sorted(k for k, v in row.items() if v is not None)
                raise TaskError(
                    f"task {self.name!r}: {rows.where(index)}: field {name!r} is missing; "
                    f"the task reads {list(self.schema)}, the row has {present}"
                )
        try:
            # The uid names the row by its place in the original split, whatever the source
            # (counting the rows `keeps` dropped).
            source = self._source_index.get(original)
            place = index if source is None else source[index]
            return self.example(row, uid=f"{original}-{place}")
        except RowError as error:
            raise TaskError(f"task {self.name!r}: {rows.where(index)}: {error}") from None

    def example(self, row: dict[str, Any], uid: str) -> Example:
        """The Example of a row that has every field of `schema`; RowError if it is bad.
        By default: a classification row whose `label` indexes the verbalizer."""
        return Example(dict(row), label_of(row, "label", len(self.verbalizer)), uid)

    # ---------------------------------------------------------------------- text

    def prompt(self, example: Example) -> str:
        return self.template.format_map(_Stripped(example.fields))

    def candidates(self, example: Example) -> list[str]:
        return list(self.verbalizer)

    def masked_form(self, example: Example) -> MaskedPrompt | None:
        if self.masked_template is None:
            return None
        words = self.masked_verbalizer or self.verbalizer
        return MaskedPrompt(self.masked_template.format_map(_Sentences(example.fields)), words)


class _Stripped(dict):
    """Row fields as the prompt shows them: text without surrounding whitespace (SST-2's
    sentences end in a space), everything else as it is."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__({k: v.strip() if isinstance(v, str) else v for k, v in fields.items()})


def unpunctuated(text: str) -> str:
    """The text without its final punctuation mark (LM-BFF's `sent-`, before "?")."""
    return text[:-1] if text[-1:] in string.punctuation else text


def lowered(text: str) -> str:
    """The text with its first letter in lower case (LM-BFF's `sentl`, after ", ")."""
    return text[:1].lower() + text[1:]


TEXT_VARIANTS: dict[str, Callable[[str], str]] = {
    "": str,
    "unpunctuated": unpunctuated,
    "lowered": lowered,
}
"""What a masked template's format spec does to a field's text: `{premise:unpunctuated}`."""


class _Sentence(str):
    """A field's stripped text whose format spec names a variant of TEXT_VARIANTS."""

    def __format__(self, spec: str) -> str:
        variant = TEXT_VARIANTS.get(spec)
        if variant is None:
            raise TaskError(
                f"template spec {spec!r} is not one of {[s for s in TEXT_VARIANTS if s]}"
            )
        return variant(str(self))


class _Sentences(_Stripped):
    """Row fields as a masked template shows them: stripped texts that take variants."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__(fields)
        self.update({k: _Sentence(v) for k, v in self.items() if isinstance(v, str)})


# ----------------------------------------------------------------------------- rows


def structured(value: Any) -> Any:
    """A list or dict field; from CSV it arrives as JSON text, decoded here."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise RowError(f"{value[:40]!r}... is not valid JSON ({error.msg})") from None
    return value


def label_of(row: Mapping[str, Any], name: str, num_labels: int) -> int:
    """The row's label as an index 0 .. num_labels - 1 (CSV gives it as text)."""
    value = row[name]
    try:
        label = int(value)
        if isinstance(value, float) and value != label:
            raise ValueError
    except (TypeError, ValueError):
        raise RowError(f"{name} {value!r} is not a whole number") from None
    if not 0 <= label < num_labels:
        hint = " (unlabelled: GLUE/SuperGLUE test splits have none)" if label == -1 else ""
        raise RowError(f"{name} {value!r} is not one of {list(range(num_labels))}{hint}")
    return label


def texts_of(value: Any, what: str) -> tuple[str, ...]:
    """A non-empty list of non-empty strings (or one string), duplicates dropped."""
    value = structured(value)
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RowError(f"{what} must be a list of strings, got {value!r}")
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    if not texts:
        raise RowError(f"{what} has no non-empty text")
    return tuple(texts)
