"""Evaluation metrics as published for each benchmark, in pure Python.

A metric takes the examples and one prediction per example and returns a dict of floats
in [0, 1] whose "score" entry is the number the papers report (MeZO: accuracy, except
F1 for MultiRC, ReCoRD, SQuAD and DROP). A prediction is a candidate index for
classification and multiple-choice tasks, and the decoded text for generation tasks.

Text is compared the SQuAD way (the official v1.1 evaluation script, also used by the
ReCoRD and MeZO evaluations): lowercase, drop punctuation, drop the articles a/an/the,
collapse whitespace; F1 over the multiset of remaining tokens; both the F1 and the exact
match of a prediction are the best over all gold answers.

DROP has its own, number-aware F1 (Dua et al., 2019, section 5): see :func:`drop_f1`.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING

from tasks.base import Example, TaskError

if TYPE_CHECKING:
    from tasks.base import Task

Prediction = int | str
Metric = Callable[[Sequence[Example], Sequence[Prediction]], dict[str, float]]

METRICS: dict[str, Metric] = {}


def _metric(name: str) -> Callable[[Metric], Metric]:
    def add(function: Metric) -> Metric:
        METRICS[name] = function
        return function

    return add


def check_metric(name: str) -> str:
    """`name` if it is a registered metric, else a TaskError listing them."""
    if name not in METRICS:
        raise TaskError(f"unknown metric {name!r}; available metrics: {sorted(METRICS)}")
    return name


def score(task: Task, examples: Sequence[Example], predictions: Sequence[Prediction]) -> dict:
    """`{"metric": task.metric, "score": ..., **extras, "num_examples": n}`."""
    values = METRICS[check_metric(task.metric)](examples, predictions)
    return {"metric": task.metric, **values, "num_examples": float(len(examples))}


# ---------------------------------------------------------------------- text comparison

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (the SQuAD v1.1 order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """F1 over the normalised tokens; two answers with no tokens left agree (1.0)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_over_answers(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(F1, EM) of a prediction against its best-matching gold answer."""
    if not answers:
        raise TaskError("an example has no gold answer to compare the prediction with")
    return (
        max(token_f1(prediction, gold) for gold in answers),
        max(exact_match(prediction, gold) for gold in answers),
    )


def _paired(examples: Sequence[Example], predictions: Sequence[Prediction]) -> None:
    if len(examples) != len(predictions):
        raise TaskError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise TaskError("a metric needs at least one example")


def _index(prediction: Prediction) -> int:
    if isinstance(prediction, bool) or not isinstance(prediction, int):
        raise TaskError(f"expected a candidate index as prediction, got {prediction!r}")
    return prediction


# ------------------------------------------------------------------------------ metrics


@_metric("accuracy")
def accuracy(examples: Sequence[Example], predictions: Sequence[Prediction]) -> dict[str, float]:
    """The fraction of examples whose predicted candidate is the gold one."""
    _paired(examples, predictions)
    correct = sum(_index(p) == e.label for e, p in zip(examples, predictions, strict=True))
    return {"score": correct / len(examples), "accuracy": correct / len(examples)}


@_metric("f1_macro")
def f1_macro(examples: Sequence[Example], predictions: Sequence[Prediction]) -> dict[str, float]:
    """The unweighted mean over classes (those gold or predicted) of each class's F1, as
    SuperGLUE reports for CB beside accuracy."""
    _paired(examples, predictions)
    pairs = [(e.label, _index(p)) for e, p in zip(examples, predictions, strict=True)]
    classes = sorted({c for pair in pairs for c in pair})
    f1s = []
    for c in classes:
        hits = sum(gold == c and pred == c for gold, pred in pairs)
        gold_count = sum(gold == c for gold, _ in pairs)
        pred_count = sum(pred == c for _, pred in pairs)
        f1s.append(2 * hits / (gold_count + pred_count))  # both counts 0 never: c occurs
    macro = sum(f1s) / len(f1s)
    return {"score": macro, "f1_macro": macro, "accuracy": accuracy(examples, predictions)["score"]}


@_metric("multirc_f1a")
def multirc_f1a(examples: Sequence[Example], predictions: Sequence[Prediction]) -> dict[str, float]:
    """MultiRC as in SuperGLUE: F1a, the binary F1 of "true" (candidate 1) over all answer
    options pooled; and EM, the fraction of questions (`Example.group`) whose every answer
    option is right. MeZO reports F1a."""
    _paired(examples, predictions)
    pairs = [(e.label == 1, _index(p) == 1) for e, p in zip(examples, predictions, strict=True)]
    hits = sum(gold and pred for gold, pred in pairs)
    gold_count = sum(gold for gold, _ in pairs)
    pred_count = sum(pred for _, pred in pairs)
    f1a = 2 * hits / (gold_count + pred_count) if gold_count + pred_count else 0.0
    right: dict[str, bool] = defaultdict(lambda: True)
    for example, prediction in zip(examples, predictions, strict=True):
        group = example.group if example.group is not None else example.uid
        right[group] &= _index(prediction) == example.label
    em = sum(right.values()) / len(right)
    return {"score": f1a, "f1a": f1a, "em": em}


def _text_scores(texts: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    scores = [best_over_answers(text, e.answers) for text, e in zip(texts, examples, strict=True)]
    f1 = sum(s[0] for s in scores) / len(scores)
    em = sum(s[1] for s in scores) / len(scores)
    return {"score": f1, "f1": f1, "em": em}


@_metric("squad_f1")
def squad_f1(examples: Sequence[Example], predictions: Sequence[Prediction]) -> dict[str, float]:
    """Generation: mean over examples of the best token F1 (and EM) against the gold
    answers in `Example.answers`."""
    _paired(examples, predictions)
    for prediction in predictions:
        if not isinstance(prediction, str):
            raise TaskError(f"squad_f1 scores decoded text, got the prediction {prediction!r}")
    return _text_scores([str(p) for p in predictions], examples)


@_metric("record_f1")
def record_f1(examples: Sequence[Example], predictions: Sequence[Prediction]) -> dict[str, float]:
    """ReCoRD: the predicted entity (a candidate index into `fields["entities"]`, the
    example's de-duplicated entities in candidate order, or the entity text) against the
    gold entities in `Example.answers`: best token F1 and EM, averaged."""
    _paired(examples, predictions)
    texts = []
    for example, prediction in zip(examples, predictions, strict=True):
        if isinstance(prediction, str):
            texts.append(prediction)
            continue
        entities = example.fields.get("entities") or []
        if not 0 <= _index(prediction) < len(entities):
            raise TaskError(
                f"example {example.uid!r}: prediction {prediction} is not one of its "
                f"{len(entities)} entities"
            )
        texts.append(entities[prediction])
    return _text_scores(texts, examples)


# ------------------------------------------------------------------------------ DROP


def _drop_number(token: str) -> float | None:
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def _drop_token(token: str) -> str:
    """A number as its float ("1,000" and "1000.0" agree), else the SQuAD normalisation."""
    number = _drop_number(token)
    if number is not None:
        return str(number)
    return normalize_answer(token)


def drop_bag(span: str) -> frozenset[str]:
    """The set of normalised tokens of one span, split on whitespace and hyphens."""
    tokens = (_drop_token(token) for token in re.split(r"[\s\-]+", span.lower()))
    return frozenset(token for token in tokens if token)


def _numbers(bag: frozenset[str]) -> set[str]:
    return {token for token in bag if _drop_number(token) is not None}


def drop_span_f1(predicted: frozenset[str], gold: frozenset[str]) -> float:
    """Token-set F1 of two spans; 0 when the gold span has numbers and none of them is in
    the prediction (DROP's rule: a wrong number is wrong, however many words match)."""
    gold_numbers = _numbers(gold)
    if gold_numbers and not gold_numbers & _numbers(predicted):
        return 0.0
    if not predicted or not gold:
        return float(predicted == gold)
    common = len(predicted & gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_matching_total(scores: list[list[float]]) -> float:
    """The largest sum of scores over one-to-one pairings of rows and columns (exact, by
    dynamic programming over subsets of the shorter side; answers have a few spans)."""
    if not scores or not scores[0]:
        return 0.0
    if len(scores[0]) > len(scores):
        scores = [list(column) for column in zip(*scores, strict=True)]
    columns = len(scores[0])

    @cache
    def best(row: int, used: int) -> float:
        if row == len(scores):
            return 0.0
        options = [best(row + 1, used)]  # this row stays unpaired
        for column in range(columns):
            if not used & (1 << column):
                options.append(scores[row][column] + best(row + 1, used | (1 << column)))
        return max(options)

    return best(0, 0)


def drop_answer_scores(
    predicted_spans: Sequence[str], gold_spans: Sequence[str]
) -> tuple[float, float]:
    """(F1, EM) of a predicted answer against one gold answer, both lists of spans.

    Spans are paired one to one so that the summed span F1 is largest; the F1 is that sum
    over the larger span count (a missing or extra span scores 0). EM: the same set of
    normalised spans.
    """
    predicted = [drop_bag(span) for span in predicted_spans]
    gold = [drop_bag(span) for span in gold_spans]
    scores = [[drop_span_f1(p, g) for p in predicted] for g in gold]
    f1 = best_matching_total(scores) / max(len(predicted), len(gold), 1)
    exact = float(len(predicted) == len(gold) and set(predicted) == set(gold))
    return f1, exact


@_metric("drop_f1")
def drop_f1(examples: Sequence[Example], predictions: Sequence[Prediction]) -> dict[str, float]:
    """DROP: the decoded text is one predicted span; `Example.answers` are the spans of the
    gold answer (several for a multi-span answer, all needed). Mean number-aware F1 and EM.
    `squad_f1` is the SQuAD-style F1 with the spans as alternative answers, the way the
    MeZO-line papers scored DROP, kept beside it for comparison."""
    _paired(examples, predictions)
    for prediction in predictions:
        if not isinstance(prediction, str):
            raise TaskError(f"drop_f1 scores decoded text, got the prediction {prediction!r}")
    scores = [
        drop_answer_scores([str(prediction)], example.answers)
        for example, prediction in zip(examples, predictions, strict=True)
    ]
    f1 = sum(score[0] for score in scores) / len(scores)
    em = sum(score[1] for score in scores) / len(scores)
    squad_style = _text_scores([str(p) for p in predictions], examples)["f1"]
    return {"score": f1, "f1": f1, "em": em, "squad_f1": squad_style}
