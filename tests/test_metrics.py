"""Metrics against values computed by hand: SQuAD normalisation, token F1 and EM, the best
over gold answers, MultiRC's F1a and EM, ReCoRD's max over gold entities, macro F1."""

from __future__ import annotations

import pytest

from tasks import get_task
from tasks.base import Example, TaskError
from tasks.metrics import (
    METRICS,
    accuracy,
    best_matching_total,
    best_over_answers,
    check_metric,
    drop_answer_scores,
    exact_match,
    f1_macro,
    multirc_f1a,
    normalize_answer,
    record_f1,
    score,
    squad_f1,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The  Cat, sat!", "cat sat"),
        ("An apple a day", "apple day"),
        ("the-cat", "thecat"),  # punctuation goes first, so "the" is no longer a word
        ("Theatre", "theatre"),  # articles only as whole words
        ("  A\tB\nC ", "b c"),
        ("", ""),
    ],
)
def test_normalisation_follows_squad(text, normal):
    assert normalize_answer(text) == normal


def test_token_f1_and_exact_match_by_hand():
    # [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # a multiset: three "cat" meet one, P = 1/3, R = 1, F1 = 0.5
    assert token_f1("cat cat cat", "cat") == pytest.approx(0.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "The") == 1.0  # both empty after normalising: they agree
    assert token_f1("a", "cat") == 0.0
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert best_over_answers("the Broncos", ["Denver Broncos", "Broncos"]) == (1.0, 1.0)
    with pytest.raises(TaskError, match="no gold answer"):
        best_over_answers("x", [])


def qa(*answers: str) -> Example:
    return Example({}, 0, f"q{len(answers)}", answers=answers)


def test_squad_f1_is_the_mean_of_the_best_per_example():
    examples = [qa("Denver Broncos", "Broncos"), qa("1902")]
    # ex 1: best F1 1 (vs "Broncos"), EM 1; ex 2: "in 1902" vs "1902": P 1/2, R 1 -> 2/3, EM 0
    result = squad_f1(examples, ["the Broncos", "in 1902"])
    assert result["f1"] == pytest.approx((1 + 2 / 3) / 2) == result["score"]
    assert result["em"] == 0.5
    with pytest.raises(TaskError, match="decoded text"):
        squad_f1(examples, [0, 1])


def test_multirc_f1a_pools_options_and_em_groups_questions():
    labels, predictions, groups = [1, 0, 1, 0, 1], [1, 1, 1, 0, 1], ["q1"] * 3 + ["q2"] * 2
    examples = [
        Example({}, label, f"a{i}", group=group)
        for i, (label, group) in enumerate(zip(labels, groups, strict=True))
    ]
    result = multirc_f1a(examples, predictions)
    # gold true 3, predicted true 4, both 3 -> F1a = 2 * 3 / (3 + 4); q1 has a wrong option
    assert result["f1a"] == pytest.approx(6 / 7) == result["score"]
    assert result["em"] == 0.5


def test_record_f1_takes_the_best_gold_entity():
    first = Example({"entities": ["Ana Silva", "Porto"]}, 0, "r1", answers=("Ana Silva",))
    second = Example({"entities": ["Boston", "York"]}, 0, "r2", answers=("New York City", "NYC"))
    # "York" vs "New York City": P 1, R 1/3 -> 0.5; vs "NYC": 0 -> best 0.5, EM 0
    result = record_f1([first, second], [0, 1])
    assert result["f1"] == pytest.approx(0.75) and result["em"] == 0.5
    assert record_f1([first, second], ["ana silva", "nyc"])["em"] == 1.0  # text predictions
    with pytest.raises(TaskError, match="not one of its 2 entities"):
        record_f1([first], [2])


def test_accuracy_and_macro_f1_by_hand():
    examples = [Example({}, label, str(i)) for i, label in enumerate([0, 1, 2, 0])]
    predictions = [0, 2, 2, 1]
    assert accuracy(examples, predictions)["score"] == 0.5
    # class 0: 2*1/(2+1); class 1: 0; class 2: 2*1/(1+2)
    assert f1_macro(examples, predictions)["score"] == pytest.approx(4 / 9)
    with pytest.raises(TaskError, match="candidate index"):
        accuracy(examples, ["0", 1, 2, 0])
    with pytest.raises(TaskError, match="3 predictions for 4 examples"):
        accuracy(examples, predictions[:3])
    with pytest.raises(TaskError, match="at least one example"):
        accuracy([], [])


def test_score_uses_the_task_metric():
    task = get_task("multirc", fixtures=True)
    examples = task.load("test")
    result = score(task, examples, [1] * len(examples))
    assert result["metric"] == "multirc_f1a" and result["num_examples"] == len(examples)
    assert result["score"] == multirc_f1a(examples, [1] * len(examples))["score"]
    assert check_metric("squad_f1") == "squad_f1"
    with pytest.raises(TaskError, match="unknown metric 'bleu'; available metrics"):
        check_metric("bleu")
    assert {"accuracy", "f1_macro", "multirc_f1a", "record_f1", "squad_f1"} <= set(METRICS)


# ------------------------------------------------------------------------------ DROP
@pytest.mark.parametrize(
    ("prediction", "gold", "f1", "em"),
    [
        ("4 touchdowns", ["4"], 2 * 0.5 * 1 / 1.5, 0.0),  # number right, one extra word
        ("5", ["4"], 0.0, 0.0),  # a wrong number is wrong
        ("three yards", ["3 yards"], 0.0, 0.0),  # SQuAD F1 would give 0.5: the number is missing
        ("1,000", ["1000"], 1.0, 1.0),  # numbers compare as numbers
        ("The Raiders.", ["raiders"], 1.0, 1.0),
        ("second-quarter", ["second quarter"], 1.0, 1.0),  # hyphens split tokens
        ("Chaz Schilens", ["Chaz Schilens", "Jason Campbell"], 0.5, 0.0),  # half the spans
        ("Jason Campbell", ["Chaz Schilens", "Jason Campbell"], 0.5, 0.0),
        ("", ["7"], 0.0, 0.0),
    ],
)
def test_drop_f1_by_hand(prediction, gold, f1, em):
    example = Example({}, 0, "d", answers=gold)
    result = METRICS["drop_f1"]([example], [prediction])
    assert result["score"] == pytest.approx(f1) and result["em"] == em


def test_drop_spans_pair_one_to_one_for_the_largest_total():
    # row by row, greedily, would take 0.9 then 0.0; the best pairing is 0.8 + 0.85
    assert best_matching_total([[0.9, 0.8], [0.85, 0.0]]) == pytest.approx(1.65)
    assert best_matching_total([[0.2], [0.7], [0.4]]) == pytest.approx(0.7)  # 3 gold, 1 pred
    f1, exact = drop_answer_scores(["a b", "a b c"], ["a b c", "a b"])  # order is free
    assert f1 == pytest.approx(1.0) and exact == 1.0
    f1, _ = drop_answer_scores(["x y"], ["x y", "z"])  # one of two gold spans, exactly
    assert f1 == pytest.approx(0.5)
    f1, _ = drop_answer_scores(["x y", "z", "w"], ["x y"])  # extra predicted spans cost too
    assert f1 == pytest.approx(1 / 3)


def test_drop_reports_the_squad_style_f1_beside_its_own():
    examples = [Example({}, 0, "d", answers=["Chaz Schilens", "Jason Campbell"])]
    result = METRICS["drop_f1"](examples, ["Chaz Schilens"])
    assert result["squad_f1"] == 1.0 and result["f1"] == 0.5  # alternatives vs all spans
    assert get_task("drop").metric == "drop_f1"
    with pytest.raises(TaskError, match="decoded text"):
        METRICS["drop_f1"](examples, [0])
