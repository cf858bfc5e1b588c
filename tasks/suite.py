"""The MeZO benchmark suite (Malladi et al. 2023) and WinoGrande (added by ZO-Bench,
Zhang et al. 2024): each task's prompt, candidates, loss kind and metric.

Rows keep the datasets' own Hugging Face schema (GLUE / SuperGLUE field names, SQuAD's
`answers`, DROP's `answers_spans`, ...), whatever the source (`tasks.sources`), and the
splits are MeZO's seeded samples (`tasks.sampling`). The prompts are those of MeZO's
appendix, written here from the paper:

- classification (cross-entropy over the candidates' length-normalised log-likelihoods):
  SST-2, RTE, CB, BoolQ, WSC, WiC and MultiRC, each with a fixed verbalizer;
- multiple choice (teacher forcing on the gold candidate's tokens, argmax at eval):
  COPA, ReCoRD, WinoGrande (partial scoring: the option is in the prompt, the rest of
  the sentence is the scored candidate);
- generation (teacher forcing on the first gold answer, greedy decoding at eval):
  SQuAD and DROP.

Metrics are the published ones: accuracy, except MultiRC (F1a), ReCoRD (F1 over the best
gold entity), SQuAD (SQuAD-style F1, with EM beside it) and DROP (its number-aware F1 over
the gold spans, with EM and the SQuAD-style F1 beside it).

MeZO's medium-model tasks (RoBERTa-large, k-shot: SST-2, SST-5, SNLI, MNLI, RTE, TREC)
are read by a masked LM in LM-BFF's manual templates (Gao et al. 2021, table 1): the label
word is predicted at a mask inside the sentence ("<sentence> It was<mask>." with
" great" / " terrible"; "<premise>?<mask>, <hypothesis>" with " Yes" / " Maybe" / " No";
"<mask>: <question>" for TREC). Those tasks carry that form (`masked_template`,
`masked_verbalizer`) beside their causal-LM prompt; scoring picks the form the model reads
(`tasks.scoring`), so a causal LM sees exactly the MeZO prompt it always did. As in
LM-BFF, a premise loses its final punctuation mark before "?" ({premise:unpunctuated})
and a hypothesis after ", " its capital first letter ({hypothesis:lowered}). SST-5, SNLI
and TREC draw test from their test split and MNLI from validation_matched (`hf_splits`),
the test sets LM-BFF and MeZO report on.

Every task takes the same options: where the data is (`path`, `fixtures`, `hub`), how
much of it to sample (`num_train`, `num_dev`, `num_test`, `sample_seed`, `test_seed`)
and what training minimises (`objective`).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tasks.base import OBJECTIVES, SPLITS, Example, MaskedPrompt, Task, TaskError, check_choice
from tasks.jsonl import Rows
from tasks.registry import register_task
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


# -------------------------------------------------------------------- classification


class SST2(SuiteTask):
    name = "sst2"
    hf_id, hf_config = GLUE, "sst2"
    schema = ("sentence", "label")
    template = "{sentence} It was"
    verbalizer = (" terrible", " great")  # 0 negative, 1 positive
    masked_template = "{sentence} It was<mask>."


class SST5(SuiteTask):
    name = "sst5"
    hf_id = "SetFit/sst5"
    hf_splits = {"validation": "test"}
    schema = ("text", "label")
    template = "{text} It was"
    # 0 very negative, 1 negative, 2 neutral, 3 positive, 4 very positive
    verbalizer = (" terrible", " bad", " okay", " good", " great")
    masked_template = "{text} It was<mask>."


class RTE(SuiteTask):
    name = "rte"
    hf_id, hf_config = SUPER_GLUE, "rte"
    schema = ("premise", "hypothesis", "label")
    template = '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'
    verbalizer = ("Yes", "No")  # 0 entailment, 1 not_entailment
    masked_template = "{premise:unpunctuated}?<mask>, {hypothesis:lowered}"
    masked_verbalizer = (" Yes", " No")


class _NLI(SuiteTask):
    """Three-way entailment over premise and hypothesis; rows without a gold label
    (label -1: SNLI's pairs whose annotators did not agree) are dropped."""

    schema = ("premise", "hypothesis", "label")
    template = (
        '{premise}\nQuestion: Does this mean that "{hypothesis}" is true? Yes, Maybe, or '
        "No?\nAnswer:"
    )
    verbalizer = (" Yes", " Maybe", " No")  # 0 entailment, 1 neutral, 2 contradiction
    masked_template = "{premise:unpunctuated}?<mask>, {hypothesis:lowered}"

    def keeps(self, row: dict[str, Any]) -> bool:
        return str(row.get("label")).strip() != "-1"


class SNLI(_NLI):
    name = "snli"
    hf_id = "stanfordnlp/snli"
    hf_splits = {"validation": "test"}


class MNLI(_NLI):
    name = "mnli"
    hf_id, hf_config = GLUE, "mnli"
    hf_splits = {"validation": "validation_matched"}


class TREC(SuiteTask):
    """Coarse question types; the words follow the dataset's label order (ABBR first)."""

    name = "trec"
    hf_id = "CogComp/trec"
    hf_splits = {"validation": "test"}
    schema = ("text", "coarse_label")
    template = "{text}\nAnswer type:"
    # 0 ABBR, 1 ENTY, 2 DESC, 3 HUM, 4 LOC, 5 NUM
    verbalizer = (" Expression", " Entity", " Description", " Human", " Location", " Number")
    masked_template = "<mask>: {text}"

    def example(self, row: dict[str, Any], uid: str) -> Example:
        return Example(dict(row), label_of(row, "coarse_label", len(self.verbalizer)), uid)


class CB(SuiteTask):
    name = "cb"
    hf_id, hf_config = SUPER_GLUE, "cb"
    schema = ("premise", "hypothesis", "label")
    template = 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'
    verbalizer = ("Yes", "No", "Maybe")  # 0 entailment, 1 contradiction, 2 neutral


class BoolQ(SuiteTask):
    name = "boolq"
    hf_id, hf_config = SUPER_GLUE, "boolq"
    schema = ("passage", "question", "label")
    template = "{passage} {question}?"
    verbalizer = (" No", " Yes")  # 0 False, 1 True


class WSC(SuiteTask):
    name = "wsc"
    hf_id, hf_config = SUPER_GLUE, "wsc.fixed"
    schema = ("text", "span1_text", "span2_text", "label")
    template = (
        '{text}\nIn the previous sentence, does the pronoun "{span2_text}" refer to '
        "{span1_text}? Yes or No?\n"
    )
    verbalizer = ("No", "Yes")  # 0 False, 1 True


class WiC(SuiteTask):
    name = "wic"
    hf_id, hf_config = SUPER_GLUE, "wic"
    schema = ("word", "sentence1", "sentence2", "label")
    template = (
        'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
        "{sentence1}\n{sentence2}\n"
    )
    verbalizer = ("No", "Yes")  # 0 different meanings, 1 the same


class MultiRC(SuiteTask):
    """One example per (paragraph, question, answer option), as the dataset's rows are;
    `Example.group` ties the options of one question for the metric's EM."""

    name = "multirc"
    metric = "multirc_f1a"
    hf_id, hf_config = SUPER_GLUE, "multirc"
    schema = ("paragraph", "question", "answer", "label")
    template = (
        '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". '
        "Is that correct? Yes or No?\n"
    )
    verbalizer = ("No", "Yes")  # 0 False, 1 True: the metric's "true" is candidate 1

    def example(self, row: dict[str, Any], uid: str) -> Example:
        # The texts, not `idx`, name the question: rows from any source group alike.
        group = f"{row['paragraph'].strip()}\n{row['question'].strip()}"
        return Example(dict(row), label_of(row, "label", 2), uid, group=group)


# ------------------------------------------------------------------- multiple choice


class COPA(SuiteTask):
    """'<premise without its period> because|so' + ' <choice, first letter lowered>'."""

    name = "copa"
    kind = "multiple_choice"
    hf_id, hf_config = SUPER_GLUE, "copa"
    schema = ("premise", "choice1", "choice2", "question", "label")
    CONNECTORS: ClassVar[dict[str, str]] = {"cause": "because", "effect": "so"}

    def example(self, row: dict[str, Any], uid: str) -> Example:
        if row["question"] not in self.CONNECTORS:
            raise RowError(f"question {row['question']!r} is not one of {list(self.CONNECTORS)}")
        return Example(dict(row), label_of(row, "label", 2), uid)

    def prompt(self, example: Example) -> str:
        premise = example.fields["premise"].strip()
        premise = premise[:-1] if premise.endswith(".") else premise
        return f"{premise} {self.CONNECTORS[example.fields['question']]}"

    def candidates(self, example: Example) -> list[str]:
        choices = (example.fields["choice1"].strip(), example.fields["choice2"].strip())
        return [" " + choice[:1].lower() + choice[1:] for choice in choices]


class ReCoRD(SuiteTask):
    """The passage (its '@highlight' lines as '- ' bullets), then the query with
    '@placeholder' replaced by each entity: the candidates are whole filled-in queries.

    `fields["entities"]` holds the row's entities de-duplicated, in candidate order (the
    metric maps a predicted index back to its text); `Example.answers` the gold ones.
    """

    name = "record"
    kind = "multiple_choice"
    metric = "record_f1"
    hf_id, hf_config = SUPER_GLUE, "record"
    schema = ("passage", "query", "entities", "answers")

    def example(self, row: dict[str, Any], uid: str) -> Example:
        entities = texts_of(row["entities"], "entities")
        answers = texts_of(row["answers"], "answers")
        if "@placeholder" not in row["query"]:
            raise RowError("the query has no '@placeholder' to fill in")
        gold = [i for i, entity in enumerate(entities) if entity in answers]
        if not gold:
            raise RowError(f"no answer {list(answers)} is among the entities {list(entities)}")
        fields = {**row, "entities": list(entities)}
        return Example(fields, gold[0], uid, group=row["query"], answers=answers)

    def prompt(self, example: Example) -> str:
        return example.fields["passage"].strip().replace("@highlight\n", "- ") + "\n"

    def candidates(self, example: Example) -> list[str]:
        query = example.fields["query"].strip()
        return [query.replace("@placeholder", entity) for entity in example.fields["entities"]]


class WinoGrande(SuiteTask):
    """Partial scoring (Trinh & Le 2018; the WinoGrande paper and ZO-Bench score it so):
    each option fills the blank of its own prompt, the sentence up to and including the
    option, and both options' candidate is the rest of the sentence after the blank.

    So only the continuation's tokens are scored, after each option; the prediction is
    the option after which it is likelier, and training is teacher forcing on it after the
    gold option. The options' own tokens are never scored (a longer or rarer name would
    otherwise lose for its spelling), and a sentence that starts with the blank still
    has a prompt: the option. `prompt` is the text before the blank, shared by both.
    """

    name = "winogrande"
    kind = "multiple_choice"
    hf_id, hf_config = "allenai/winogrande", "winogrande_xl"
    schema = ("sentence", "option1", "option2", "answer")

    def example(self, row: dict[str, Any], uid: str) -> Example:
        blanks = row["sentence"].count("_")
        if blanks != 1:
            raise RowError(f"the sentence must hold one blank '_', it holds {blanks}")
        if not row["sentence"].strip().split("_")[1].strip():
            raise RowError(
                "nothing follows the blank '_'; partial scoring scores the text after it"
            )
        if str(row["answer"]).strip() not in ("1", "2"):
            raise RowError(f"answer {row['answer']!r} is not '1' or '2'")
        return Example(dict(row), int(str(row["answer"]).strip()) - 1, uid)

    def _halves(self, example: Example) -> tuple[str, str]:
        before, after = example.fields["sentence"].strip().split("_")
        return before, after

    def _options(self, example: Example) -> tuple[str, str]:
        return example.fields["option1"].strip(), example.fields["option2"].strip()

    def prompt(self, example: Example) -> str:
        return self._halves(example)[0].rstrip(" ")

    def candidate_prompts(self, example: Example) -> list[str]:
        before = self._halves(example)[0]
        return [before + option for option in self._options(example)]

    def candidates(self, example: Example) -> list[str]:
        after = self._halves(example)[1]
        return [after for _ in self._options(example)]


# ------------------------------------------------------------------------ generation


class _Extractive(SuiteTask):
    """A template over the passage and question; the gold answers are the texts in
    `row[answer_field][answer_key]` (a list, all accepted by the metric)."""

    kind = "generation"
    metric = "squad_f1"
    answer_field: ClassVar[str]
    answer_key: ClassVar[str]

    def example(self, row: dict[str, Any], uid: str) -> Example:
        nested = structured(row[self.answer_field])
        if not isinstance(nested, dict) or self.answer_key not in nested:
            raise RowError(
                f"{self.answer_field} must be an object with a {self.answer_key!r} list, "
                f"got {nested!r}"
            )
        answers = texts_of(nested[self.answer_key], f"{self.answer_field}.{self.answer_key}")
        return Example(dict(row), 0, uid, answers=answers)

    candidates = Task.candidates  # free-form answers: no candidate set, a clear error


class SQuAD(_Extractive):
    name = "squad"
    hf_id, hf_config = "rajpurkar/squad", None
    schema = ("title", "context", "question", "answers")
    answer_field, answer_key = "answers", "text"
    template = "Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"


class DROP(_Extractive):
    """The gold spans are one answer (all of a multi-span answer), scored by DROP's
    number-aware F1 (`tasks.metrics.drop_f1`)."""

    name = "drop"
    metric = "drop_f1"
    hf_id, hf_config = "ucinlp/drop", None
    schema = ("passage", "question", "answers_spans")
    answer_field, answer_key = "answers_spans", "spans"
    template = "Passage: {passage}\nQuestion: {question}\nAnswer:"


SUITE: dict[str, type[SuiteTask]] = {
    task.name: task
    for task in (
        SST2,
        RTE,
        CB,
        BoolQ,
        WSC,
        WiC,
        MultiRC,
        COPA,
        ReCoRD,
        SQuAD,
        DROP,
        WinoGrande,
        SST5,
        SNLI,
        MNLI,
        TREC,
    )
}
"""The suite by task name, in the order of the MeZO paper (WinoGrande last), then the
rest of MeZO's RoBERTa-large tasks (SST-2 and RTE are among the first)."""

for _name, _task in SUITE.items():
    register_task(_name, _task)
