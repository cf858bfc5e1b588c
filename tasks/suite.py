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
(`tasks.lm.scorer_for`), so a causal LM sees exactly the MeZO prompt it always did. As in
LM-BFF, a premise loses its final punctuation mark before "?" ({premise:unpunctuated})
and a hypothesis after ", " its capital first letter ({hypothesis:lowered}). SST-5, SNLI
and TREC draw test from their test split and MNLI from validation_matched (`hf_splits`),
the test sets LM-BFF and MeZO report on.

Every task is a `tasks.suite_task.SuiteTask`: its options are that dataclass's fields.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tasks.base import Example, Task
from tasks.registry import register_task, the_options
from tasks.suite_task import GLUE, SUPER_GLUE, RowError, SuiteTask, label_of, structured, texts_of

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

for _task in SUITE.values():
    # the task class is its own options dataclass
    register_task(_task.name, _task, the_options, kinds=(_task.kind,), fixtures=True)
