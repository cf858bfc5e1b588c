"""Evaluation for every task kind, batched: predictions, then the task's metric.

`evaluate` predicts every example, then scores the predictions with the task's metric
(`tasks.metrics.score`). Training losses are in `tasks.losses`.

- Candidate kinds: all candidates of `batch_size` examples in one padded forward, logits
  only at scored positions (`score_rows`); the prediction is the argmax. Causal and
  masked LMs alike: the layout follows the model. With `prefix_cache` ("auto" in
  `evaluate`), a causal LM runs each example's prompt once and scores its candidates
  after the prompt's KV cache where that pays (`tasks.prefix_cache` states the rule).
- generation: greedy decoding of `batch_size` left-padded prompts at a time with the KV
  cache, stopped at a newline or EOS (`tasks.generation`).

Calibration (`calibrate=True`, candidate kinds) corrects for surface-form competition:
a candidate that is likely after any input wins too often. The score of candidate c on
input x becomes

    log P(c | prompt(x)) - log P(c | prompt(x_cf))

with both log-probabilities the *sum* over c's tokens (not the length-normalised mean)
and x_cf the example with every text field replaced by `content_free` ("" by default,
so "{text} It was" reads " It was"). That is domain-conditional PMI (Holtzman et al.
2021, the template standing in for the domain premise) and MeZO's SFC option; with
`content_free="N/A"` the content-free input is that of Zhao et al. 2021 (contextual
calibration), applied here as a log-probability offset. A task can choose its own
content-free prompt with a `content_free_prompt(example)` method. Identical content-free
rows (a fixed verbalizer after a template) are scored once. Partial scoring (a prompt per
candidate, one shared continuation) has no content-free counterpart, so calibrating it is
an error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn

from tasks.base import Example, Task, TaskError, check_choice
from tasks.encoding import ScoringRow, rows_of
from tasks.generation import GreedyConfig, greedy_generate
from tasks.lm import PREFIX_CACHE_MODES, evaluation_mode, is_masked_lm, model_device, scorer_for
from tasks.losses import candidate_log_likelihoods, task_kind
from tasks.prefix_cache import prefix_table, use_prefix_cache

Prediction = int | str


@dataclass(frozen=True)
class EvalSettings:
    """How `evaluate` predicts."""

    batch_size: int = 32
    """Examples per forward (candidate kinds) or per decoded batch (generation)."""
    max_length: int = 256
    """Tokens per sequence; longer prompts lose tokens from the left."""
    calibrate: bool = False
    """Candidate kinds: subtract each candidate's content-free log-probability (module doc)."""
    content_free: str = ""
    """What every text field of an example becomes in the content-free input."""
    greedy: GreedyConfig = field(default_factory=GreedyConfig)
    """Generation: max_new_tokens and stop strings (its max_length is `max_length`)."""
    prefix_cache: str = "never"
    """Candidate kinds: "auto", "always" or "never" run a shared prompt once and score the
    candidates after its KV cache (`tasks.prefix_cache`). "never" by default, so metric
    objectives during training (`tasks.objectives`) keep their exact scores; `evaluate`
    uses "auto"."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise TaskError(f"batch_size must be >= 1, got {self.batch_size}")
        check_choice("prefix_cache", self.prefix_cache, PREFIX_CACHE_MODES)


def score_rows(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[ScoringRow],
    batch_size: int = 32,
    max_length: int = 256,
    normalize: bool = True,
    prefix_cache: str = "never",
) -> list[Tensor]:
    """Per row, the [C] candidate log-likelihoods (on CPU), in `batch_size`-row forwards.

    Rows are batched in order of prompt length, so a batch pads to similar lengths; the
    result is in the order of `rows`. Call it under `evaluation_mode` or `no_grad`.
    `prefix_cache` ("auto", "always", "never"): whether a batch may run each shared
    prompt once and score the candidates after its KV cache (`tasks.prefix_cache`, which
    states the rule); the scores agree up to rounding.
    """
    if batch_size < 1:
        raise TaskError(f"batch_size must be >= 1, got {batch_size}")
    check_choice("prefix_cache", prefix_cache, PREFIX_CACHE_MODES)
    scorer, device = scorer_for(model), model_device(model)
    cached = use_prefix_cache(model, prefix_cache)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))
    scores: list[Tensor | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        part = [rows[i] for i in chunk]
        table = None
        if cached:
            table = prefix_table(model, tokenizer, part, max_length, normalize, prefix_cache)
        if table is None:
            batch = scorer.encode(tokenizer, part, max_length).to(device)
            table = candidate_log_likelihoods(model, batch, normalize)
        table = table.cpu()
        for b, i in enumerate(chunk):
            scores[i] = table[b, : len(rows[i].candidates)]
    return scores  # type: ignore[return-value]  (every slot is filled)


def predict(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_length: int = 256,
    prefix_cache: str = "auto",
) -> list[int]:
    """The index of the best-scoring candidate per example."""
    with evaluation_mode(model):
        rows = rows_of(task, examples)
        scores = score_rows(model, tokenizer, rows, batch_size, max_length, True, prefix_cache)
    return [int(s.argmax()) for s in scores]


def content_free_row(task: Task, example: Example, row: ScoringRow, filler: str) -> ScoringRow:
    """`row` with the prompt of the content-free input (same candidates and label)."""
    own = getattr(task, "content_free_prompt", None)
    if own is not None:  # a prompt of the task's own: no masked-LM form matches it
        return replace(row, prompt=own(example), masked=None, masked_of=None)
    blank = {k: filler if isinstance(v, str) else v for k, v in example.fields.items()}
    # built like any row, so a masked LM reads the content-free input in its masked form
    return rows_of(task, [replace(example, fields=blank)])[0]


def calibrated_scores(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    settings: EvalSettings,
) -> list[Tensor]:
    """Per example, [C]: total log P(c | x) - total log P(c | x_cf) (module doc)."""
    rows = rows_of(task, examples)
    if any(row.prompts is not None for row in rows):
        raise TaskError(
            f"task {task.name!r} scores each candidate after a prompt of its own (partial "
            "scoring); calibration subtracts the candidates' scores after one content-free "
            "prompt, which has no counterpart here: set calibrate=False"
        )
    free = [
        content_free_row(task, e, r, settings.content_free)
        for e, r in zip(examples, rows, strict=True)
    ]
    keys = [(r.prompt, tuple(r.candidates)) for r in free]
    first: dict[tuple, ScoringRow] = {}
    for key, row in zip(keys, free, strict=True):
        first.setdefault(key, row)
    unique = list(first)
    score = functools.partial(
        score_rows,
        model,
        tokenizer,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        normalize=False,
        prefix_cache=settings.prefix_cache,
    )
    totals, offsets = score(rows), score([first[key] for key in unique])
    offset_of = dict(zip(unique, offsets, strict=True))
    return [total - offset_of[key] for total, key in zip(totals, keys, strict=True)]


def candidate_scores(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    settings: EvalSettings,
) -> list[Tensor]:
    """Per example, the [C] scores its prediction is the argmax of (fp32, on CPU)."""
    task = task.for_tokenizer(tokenizer)
    if settings.calibrate:
        return calibrated_scores(model, tokenizer, task, examples, settings)
    rows = rows_of(task, examples)
    return score_rows(
        model,
        tokenizer,
        rows,
        settings.batch_size,
        settings.max_length,
        prefix_cache=settings.prefix_cache,
    )


def _candidate_predictions(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    settings: EvalSettings,
) -> tuple[list[Prediction], dict[str, float]]:
    scores = candidate_scores(model, tokenizer, task, examples, settings)
    predictions: list[Prediction] = [int(s.argmax()) for s in scores]
    extras = {}
    if task_kind(task) == "classification" and not settings.calibrate:
        # The training loss, free from the scores at hand.
        losses = [-float(s.log_softmax(0)[e.label]) for s, e in zip(scores, examples, strict=True)]
        extras["loss"] = sum(losses) / len(losses)
    return predictions, extras


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    settings: EvalSettings,
) -> list[str]:
    """The greedy answer per example, whitespace-stripped, batched by prompt length."""
    if is_masked_lm(model):
        raise TaskError(
            f"task {task.name!r} is a generation task; a masked LM "
            f"({type(model).__name__}) cannot decode answers: use a causal LM"
        )
    greedy = replace(settings.greedy, max_length=settings.max_length)
    task = task.for_tokenizer(tokenizer)
    prompts = [task.prompt(example) for example in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), settings.batch_size):
        chunk = order[start : start + settings.batch_size]
        generations = greedy_generate(model, tokenizer, [prompts[i] for i in chunk], greedy)
        for i, generation in zip(chunk, generations, strict=True):
            answers[i] = generation.text.strip()
    return answers


def _generation_predictions(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    settings: EvalSettings,
) -> tuple[list[Prediction], dict[str, float]]:
    if settings.calibrate:
        raise TaskError(
            f"task {task.name!r} is a generation task; calibration applies to candidate "
            "scores only: set calibrate=False"
        )
    return list(generate_answers(model, tokenizer, task, examples, settings)), {}


Predictor = Callable[
    [nn.Module, Any, Task, Sequence[Example], EvalSettings],
    tuple[list[Prediction], dict[str, float]],
]
PREDICTORS: Mapping[str, Predictor] = {
    "classification": _candidate_predictions,
    "multiple_choice": _candidate_predictions,
    "generation": _generation_predictions,
}


def predictions_with_extras(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    settings: EvalSettings,
) -> tuple[list[Prediction], dict[str, float]]:
    """Candidate indices or answers, plus what came for free (classification's loss).

    Runs in the caller's grad and module modes; `evaluate` sets eval + inference mode.
    """
    return PREDICTORS[task_kind(task)](model, tokenizer, task, examples, settings)


def summarize(
    task: Task, examples: Sequence[Example], predictions: Sequence[Prediction]
) -> dict[str, Any]:
    """The task's metric, plus accuracy for candidate kinds (defined for all of them)."""
    from tasks import metrics  # its own import cost stays out of `import tasks.evaluation`

    summary = dict(metrics.score(task, examples, predictions))
    if task_kind(task) != "generation":
        correct = sum(p == e.label for p, e in zip(predictions, examples, strict=True))
        summary["accuracy"] = correct / len(examples)
    return summary


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_length: int = 256,
    calibrate: bool = False,
    max_new_tokens: int = GreedyConfig.max_new_tokens,
    content_free: str = "",
    prefix_cache: str = "auto",
) -> dict[str, Any]:
    """`metric`, `score` and the metric's other values; `accuracy` for candidate kinds;
    `loss` for classification without calibration; `num_examples`.

    Runs in eval and inference mode and restores every module's mode afterwards.
    """
    if not examples:
        raise TaskError(f"task {task.name!r}: no examples to evaluate")
    settings = EvalSettings(
        batch_size=batch_size,
        max_length=max_length,
        calibrate=calibrate,
        content_free=content_free,
        greedy=GreedyConfig(max_new_tokens=max_new_tokens, max_length=max_length),
        prefix_cache=prefix_cache,
    )
    with evaluation_mode(model):
        predictions, extras = predictions_with_extras(model, tokenizer, task, examples, settings)
    return {**summarize(task, examples, predictions), **extras, "num_examples": len(examples)}


__all__ = [
    "PREDICTORS",
    "EvalSettings",
    "calibrated_scores",
    "candidate_scores",
    "evaluate",
    "generate_answers",
    "predict",
    "predictions_with_extras",
    "score_rows",
    "summarize",
]
