"""Evaluation of every task kind and the metric objectives, against references computed one
example at a time with full logits (scores) or without a cache (greedy decoding)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import estimators
from estimators.zo_sgd import ZOSGDConfig
from tasks import metrics
from tasks.base import Example, Task, TaskError
from tasks.evaluation import EvalSettings, calibrated_scores, evaluate
from tasks.losses import batch_loss, make_batch
from tasks.objectives import (
    objective_closure,
    objective_is_differentiable,
    require_differentiable,
)
from tests.tiny import lively
from zo.engine import EngineConfig
from zo.models import masked_byte_tokenizer, tiny_model


@dataclass
class TemplateTask(Task):
    """Prompt = "{text} It was"; candidates from fields["options"] or the fixed `words`."""

    name: str = "template"
    kind: str = "classification"
    metric: str = "accuracy"
    objective: str = "loss"
    words: tuple[str, ...] = (" bad", " good")

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def prompt(self, example: Example) -> str:
        return f"{example.fields['text']} It was"

    def candidates(self, example: Example) -> list[str]:
        return list(example.fields.get("options", self.words))


@dataclass
class AnswerTask(TemplateTask):
    name: str = "answers"
    kind: str = "generation"
    metric: str = "squad_f1"

    def prompt(self, example: Example) -> str:
        return example.fields["text"]


REVIEWS = [Example({"text": f"Film {i}{'!' * i}"}, label=i % 2, uid=f"r{i}") for i in range(6)]
CHOICES = [
    Example({"text": "Tea", "options": [" hot", " cold and sweet"]}, label=1, uid="a"),
    Example({"text": "The longest text of them", "options": [" here", ".", " now!"]}, 0, "b"),
    Example({"text": "Hi", "options": ["?", " there, friend", "!"]}, label=1, uid="c"),
]
QUESTIONS = ["Q: capital of France?\nA:", "Q: 2+2?\nA:", "Tell me"]


@pytest.fixture(scope="module", params=["llama", "opt"])
def causal(request):
    return lively(request.param)


def total_log_prob(model, tokenizer, prompt: str, candidate: str) -> float:
    """Sum of the candidate's token log-probs, one pair per forward, full logits."""
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(candidate, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([context + answer])).logits[0].float().log_softmax(-1)
    return float(sum(logp[len(context) - 1 + j, t] for j, t in enumerate(answer)))


def reference_scores(model, tokenizer, task, example) -> torch.Tensor:
    prompt = task.prompt(example)
    return torch.tensor(
        [
            total_log_prob(model, tokenizer, prompt, c) / len(tokenizer(c)["input_ids"])
            for c in task.candidates(example)
        ]
    )


def naive_answer(model, tokenizer, prompt: str, steps: int) -> str:
    """Greedy without padding or cache; stops at a newline, as evaluation does."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
            if "\n" in tokenizer.decode(out) or out[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip()


def qa_examples(model, tokenizer) -> list[Example]:
    """Gold answers that the greedy answer matches fully, partly, and not at all."""
    first = naive_answer(model, tokenizer, QUESTIONS[0], 6)
    return [
        Example({"text": QUESTIONS[0]}, 0, "q0", answers=(first,)),
        Example({"text": QUESTIONS[1]}, 0, "q1", answers=("nothing like it",)),
        Example({"text": QUESTIONS[2]}, 0, "q2", answers=("a", "b")),
    ]


# ------------------------------------------------------------------- candidate kinds


@pytest.mark.parametrize("kind", ["classification", "multiple_choice"])
def test_evaluate_candidate_kinds_against_references(causal, kind):
    model, tokenizer = causal
    task = TemplateTask(kind=kind)
    examples = REVIEWS if kind == "classification" else CHOICES
    references = [reference_scores(model, tokenizer, task, e) for e in examples]
    predictions = [int(r.argmax()) for r in references]
    accuracy = sum(p == e.label for p, e in zip(predictions, examples, strict=True)) / len(examples)
    result = evaluate(model, tokenizer, task, examples, batch_size=2, max_length=64)
    assert result["metric"] == "accuracy" and result["num_examples"] == len(examples)
    assert result["score"] == result["accuracy"] == pytest.approx(accuracy)
    if kind == "classification":
        loss = sum(
            -float(r.log_softmax(0)[e.label]) for r, e in zip(references, examples, strict=True)
        )
        assert result["loss"] == pytest.approx(loss / len(examples), abs=1e-5)
    else:
        assert "loss" not in result  # CE over candidates is not this kind's training loss


def test_calibration_subtracts_content_free_log_probs(causal):
    model, tokenizer = causal
    task = TemplateTask(kind="multiple_choice")
    settings = EvalSettings(batch_size=2, max_length=64, calibrate=True, content_free="N/A")
    with torch.no_grad():
        scores = calibrated_scores(model, tokenizer, task, CHOICES, settings)
    for example, calibrated in zip(CHOICES, scores, strict=True):
        expected = [
            total_log_prob(model, tokenizer, task.prompt(example), c)
            - total_log_prob(model, tokenizer, "N/A It was", c)
            for c in task.candidates(example)
        ]
        torch.testing.assert_close(calibrated, torch.tensor(expected), atol=1e-4, rtol=0)
    result = evaluate(model, tokenizer, task, CHOICES, calibrate=True, content_free="N/A")
    predictions = [int(s.argmax()) for s in scores]
    assert result["accuracy"] == pytest.approx(
        sum(p == e.label for p, e in zip(predictions, CHOICES, strict=True)) / len(CHOICES)
    )


@pytest.mark.parametrize("prefix_cache", ["never", "always"])
def test_calibration_scores_a_shared_content_free_row_once(causal, prefix_cache):
    model, tokenizer = causal
    rows = []
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    handle = backbone.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        evaluate(
            model,
            tokenizer,
            TemplateTask(),
            REVIEWS,
            batch_size=32,
            calibrate=True,
            prefix_cache=prefix_cache,
        )
    finally:
        handle.remove()
    # " bad" and " good" are several byte tokens, so a row is two sequences: two per
    # review, and two for the one content-free row " It was" that all reviews share.
    # Through the prefix cache a row is its prompt, then its two continuations.
    per_row = 2 if prefix_cache == "never" else 3
    assert sum(rows) == per_row * (len(REVIEWS) + 1)


def test_a_task_may_choose_its_content_free_prompt(causal):
    model, tokenizer = causal

    @dataclass
    class Premise(TemplateTask):
        def content_free_prompt(self, example: Example) -> str:
            return "Answer:"

    with torch.no_grad():
        (scores,) = calibrated_scores(
            model, tokenizer, Premise(), REVIEWS[:1], EvalSettings(calibrate=True)
        )
    expected = [
        total_log_prob(model, tokenizer, "Film 0 It was", c)
        - total_log_prob(model, tokenizer, "Answer:", c)
        for c in (" bad", " good")
    ]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=0)


def test_evaluate_leaves_every_module_mode_as_it_was(causal):
    model, tokenizer = causal
    model.train()
    before = [m.training for m in model.modules()]
    evaluate(model, tokenizer, AnswerTask(), qa_examples(model, tokenizer), max_new_tokens=3)
    assert [m.training for m in model.modules()] == before
    model.eval()
    with pytest.raises(TaskError, match="no examples"):
        evaluate(model, tokenizer, TemplateTask(), [])


# ----------------------------------------------------------------------- generation


def test_evaluate_generation_scores_greedy_answers(causal):
    model, tokenizer = causal
    examples = qa_examples(model, tokenizer)
    answers = [naive_answer(model, tokenizer, e.fields["text"], 6) for e in examples]
    result = evaluate(model, tokenizer, AnswerTask(), examples, batch_size=2, max_new_tokens=6)
    expected = metrics.score(AnswerTask(), examples, answers)
    assert result["metric"] == "squad_f1" and "accuracy" not in result
    assert result["score"] == pytest.approx(expected["score"])
    assert result["f1"] == pytest.approx(expected["f1"]) and result["em"] == expected["em"]
    assert result["score"] >= 1 / 3  # the first answer is matched exactly


def test_generation_refuses_calibration(causal):
    model, tokenizer = causal
    with pytest.raises(TaskError, match="calibration applies to candidate scores"):
        evaluate(model, tokenizer, AnswerTask(), qa_examples(model, tokenizer), calibrate=True)


# ----------------------------------------------------------------------- objectives


def test_f1_objective_closure_returns_minus_f1_of_the_generations(causal):
    model, tokenizer = causal
    examples = qa_examples(model, tokenizer)
    task = AnswerTask(objective="f1")
    closure = objective_closure(model, tokenizer, task, examples, max_new_tokens=6)
    answers = [naive_answer(model, tokenizer, e.fields["text"], 6) for e in examples]
    f1 = (
        sum(
            metrics.best_over_answers(a, e.answers)[0]
            for a, e in zip(answers, examples, strict=True)
        )
        / 3
    )
    value = closure()
    assert value.dim() == 0 and value.item() == pytest.approx(-f1)
    assert f1 >= 1 / 3
    assert not objective_is_differentiable(task)
    with pytest.raises(TaskError, match="estimator lomo .* use a zeroth-order estimator"):
        require_differentiable(task, "lomo")


def test_accuracy_objective_closure_returns_minus_accuracy(causal):
    model, tokenizer = causal
    task = TemplateTask(objective="accuracy")
    references = [reference_scores(model, tokenizer, task, e) for e in REVIEWS]
    accuracy = sum(int(r.argmax()) == e.label for r, e in zip(references, REVIEWS, strict=True)) / 6
    assert objective_closure(model, tokenizer, task, REVIEWS)().item() == pytest.approx(-accuracy)


def test_loss_objective_closure_is_the_batch_loss(causal):
    model, tokenizer = causal
    task = AnswerTask()
    examples = qa_examples(model, tokenizer)
    assert objective_is_differentiable(task)
    require_differentiable(task, "lomo")  # no error
    closure = objective_closure(model, tokenizer, task, examples)
    with torch.no_grad():
        expected = batch_loss(model, make_batch(tokenizer, task, examples, model=model))
        assert closure().item() == expected.item()


def minus_metric(model, tokenizer, task, examples) -> float:
    """The objective computed the reference way: full logits or uncached greedy decoding."""
    if task.kind == "generation":
        answers = [naive_answer(model, tokenizer, e.fields["text"], 6) for e in examples]
        return -metrics.score(task, examples, answers)["f1"]
    scores = [reference_scores(model, tokenizer, task, e) for e in examples]
    return -sum(int(s.argmax()) == e.label for s, e in zip(scores, examples, strict=True)) / len(
        examples
    )


@pytest.mark.parametrize("objective", ["accuracy", "f1"])
def test_zo_sgd_step_on_a_metric_objective_equals_a_dense_reference(objective):
    """The finite difference of -metric at W +- eps z, and the update W - lr g z."""
    model, tokenizer = lively("llama")  # its own copy: the step changes the weights
    task = (
        TemplateTask(objective="accuracy")
        if objective == "accuracy"
        else AnswerTask(objective="f1")
    )
    examples = REVIEWS if objective == "accuracy" else qa_examples(model, tokenizer)
    reference = copy.deepcopy(model)
    lr, eps = 1e-3, 0.03
    optimizer = estimators.build_estimator(
        "zo_sgd",
        list(model.named_parameters()),
        ZOSGDConfig(lr=lr, eps=eps),
        seed=2,
        # a metric is coarse: most directions at this eps flip every prediction or none;
        # this seed's direction under torch-blocks changes some (the arithmetic checked
        # below is the same for every generator)
        engine=EngineConfig(generator="torch-blocks"),
    )
    closure = objective_closure(model, tokenizer, task, examples, max_new_tokens=6)
    estimate = optimizer.estimate(closure)

    seed = estimate.seeds[0]
    params = list(reference.parameters())
    directions = [optimizer.engine.direction(seed, i) for i in range(len(params))]
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, z in zip(params, directions, strict=True):
                p.add_(sign * eps * z)
            values.append(minus_metric(reference, tokenizer, task, examples))
            for p, z in zip(params, directions, strict=True):
                p.sub_(sign * eps * z)
    plus, minus = values
    assert plus != minus  # the perturbation changes predictions: a non-vacuous step
    assert estimate.scalars[0] == pytest.approx((plus - minus) / (2 * eps), rel=1e-5)
    assert estimate.loss == pytest.approx((plus + minus) / 2, abs=1e-6)

    optimizer.step()
    grad = estimate.scalars[0]
    for p, q, z in zip(model.parameters(), params, directions, strict=True):
        torch.testing.assert_close(p, q - lr * grad * z, rtol=1e-5, atol=1e-6)


def test_objective_the_metric_does_not_report_is_an_error(causal):
    model, tokenizer = causal
    examples = qa_examples(model, tokenizer)
    with pytest.raises(TaskError, match="objective 'accuracy' is not among"):
        objective_closure(model, tokenizer, AnswerTask(), examples, "accuracy")()
    with pytest.raises(TaskError, match="objective 'f1' is not among"):
        objective_closure(model, tokenizer, TemplateTask(), REVIEWS, "f1")()
    with pytest.raises(TaskError, match="objective 'bleu' is not one of"):
        objective_closure(model, tokenizer, TemplateTask(), REVIEWS, "bleu")


# ------------------------------------------------------------------------ masked LMs


def test_masked_lm_evaluation_against_a_hand_computation():
    model, _ = tiny_model("roberta", seed=3)
    tokenizer = masked_byte_tokenizer()
    task = TemplateTask(words=("+", "-"))
    predictions = []
    for example in REVIEWS:
        ids = tokenizer(task.prompt(example) + "<mask>")["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, ids.index(tokenizer.mask_token_id)]
        predictions.append(int(logits[[tokenizer.convert_tokens_to_ids(w) for w in "+-"]].argmax()))
    result = evaluate(model, tokenizer, task, REVIEWS, batch_size=4)
    assert result["accuracy"] == pytest.approx(
        sum(p == e.label for p, e in zip(predictions, REVIEWS, strict=True)) / len(REVIEWS)
    )
    with pytest.raises(TaskError, match="masked LM .* cannot decode"):
        evaluate(model, tokenizer, AnswerTask(), [Example({"text": "Q"}, 0, "q", answers=("a",))])
