"""Training losses: log-likelihoods of scored tokens, and the loss of each task kind.

Training: `make_batch` encodes what a kind's loss reads, `batch_loss` computes it.

- classification: every candidate is scored; cross-entropy over their length-normalised
  log-likelihoods.
- multiple_choice, generation: only the gold candidate (or the first gold answer) is
  encoded; the mean NLL of its tokens, prompt and padding masked out (teacher forcing).
  With a prompt per candidate (partial scoring, WinoGrande) that is the shared
  continuation after the gold candidate's prompt.

Both work under `torch.no_grad()` (ZO closures) and with autograd alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import KINDS, Example, Task, TaskError, check_choice
from tasks.encoding import CandidateBatch, ScoringRow, encode_rows, rows_of
from tasks.lm import backbone_and_head, head_logits, is_masked_lm, scorer_for


def task_kind(task: Task) -> str:
    return check_choice(f"task {task.name!r}: kind", getattr(task, "kind", None), KINDS)


# ------------------------------------------------------------------- token scores


def token_log_probs(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """[K]: the fp32 log-probability of each scored candidate token."""
    scorer = scorer_for(model)
    if type(batch) is not scorer.layout:
        raise TaskError(
            f"the batch has the {type(batch).__name__} layout but {type(model).__name__} "
            f"needs {scorer.layout.__name__}: encode it for this model "
            "(tasks.evaluation.make_batch(..., model=model))"
        )
    backbone, head = backbone_and_head(model)
    # use_cache=False: a KV cache would be built for nothing and cost memory.
    output = backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    hidden = output[0]  # last_hidden_state, as a ModelOutput or a tuple
    picked = hidden[batch.score_rows, batch.score_positions]  # [Q, H]
    log_probs = head_logits(model, head, picked).log_softmax(dim=-1)  # [Q, V]
    return log_probs[batch.target_slot, batch.target_ids]


def pair_totals(batch: Any, token_scores: Tensor, normalize: bool = True) -> Tensor:
    """[P]: the scored tokens summed per pair, divided by the pair's length if `normalize`.

    `batch` is any layout with the pair fields of a CandidateBatch (target_pair,
    candidate_lengths, ...), as the prefix-cache layout (`tasks.prefix_cache`) has.
    """
    totals = token_scores.new_zeros(batch.num_pairs).index_add(0, batch.target_pair, token_scores)
    return totals / batch.candidate_lengths.to(totals.dtype) if normalize else totals


def candidate_table(batch: Any, pair_scores: Tensor) -> Tensor:
    """[B, C_max]: the pair scores arranged per row and candidate; -inf where none."""
    max_candidates = int(batch.num_candidates.max())
    table = pair_scores.new_full((batch.num_examples, max_candidates), float("-inf"))
    # Out of place, so autograd sees it (first-order baselines differentiate this).
    return table.index_put((batch.example_index, batch.candidate_index), pair_scores)


def pair_log_likelihoods(model: nn.Module, batch: CandidateBatch, normalize: bool = True) -> Tensor:
    """[P]: each pair's candidate log-likelihood, the mean over its tokens (or the sum)."""
    return pair_totals(batch, token_log_probs(model, batch), normalize)


def candidate_log_likelihoods(
    model: nn.Module, batch: CandidateBatch, normalize: bool = True
) -> Tensor:
    """[B, C_max]: the log-likelihood of each candidate (length-normalised); -inf where none."""
    return candidate_table(batch, pair_log_likelihoods(model, batch, normalize))


def classification_loss(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """Mean over examples of -log softmax(candidate scores)[gold]: a scalar tensor.

    Works under `torch.no_grad()` (ZO closures) and with autograd alike; the -inf padding
    gets zero probability and zero gradient.
    """
    return F.cross_entropy(candidate_log_likelihoods(model, batch), batch.labels)


def teacher_forcing_loss(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """Mean NLL over the gold candidates' tokens, pooled over the batch: a scalar tensor.

    The causal-LM loss with labels -100 on prompt and padding (MeZO's loss for multiple
    choice and generation): every gold token counts once, so long answers weigh more.
    """
    token_scores = token_log_probs(model, batch)
    pair = batch.target_pair
    gold = batch.candidate_index[pair] == batch.labels[batch.example_index[pair]]
    return -token_scores[gold].mean()


# -------------------------------------------------------------- the kinds' losses

KIND_LOSSES: Mapping[str, Callable[[nn.Module, CandidateBatch], Tensor]] = {
    "classification": classification_loss,
    "multiple_choice": teacher_forcing_loss,
    "generation": teacher_forcing_loss,
}


@dataclass(frozen=True)
class TaskBatch:
    """A training batch: the encoded pairs and the task kind whose loss reads them."""

    kind: str
    pairs: CandidateBatch

    @property
    def num_examples(self) -> int:
        return self.pairs.num_examples

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        return replace(self, pairs=self.pairs.to(device, non_blocking=non_blocking))


def gold_rows(task: Task, examples: Sequence[Example]) -> list[ScoringRow]:
    """Each example's teacher-forcing target as a one-candidate row: the gold candidate
    (after its own prompt, if it has one), or for generation the first gold answer."""
    if task_kind(task) != "generation":
        return [
            replace(
                r,
                candidates=[r.candidates[r.label]],
                label=0,
                # kept as a one-prompt list, so a masked LM refuses it as it refuses eval
                prompts=None if r.prompts is None else [r.prompts[r.label]],
            )
            for r in rows_of(task, examples)
        ]
    rows = []
    for example in examples:
        answers = task.answers(example)
        if not answers or not answers[0]:
            raise TaskError(
                f"task {task.name!r}: example {example.uid!r} has no gold answer to train on"
            )
        rows.append(ScoringRow(task.prompt(example), [answers[0]], 0, example.uid))
    return rows


def make_batch(
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    max_length: int = 256,
    *,
    model: nn.Module | None = None,
) -> TaskBatch:
    """What `batch_loss` needs for these examples, in the layout of `model`.

    Without `model` the causal-LM layout is used; `batch_loss` then refuses a masked LM.
    """
    kind, task = task_kind(task), task.for_tokenizer(tokenizer)
    if not examples:
        raise TaskError(f"task {task.name!r}: a batch needs at least one example")
    if kind == "generation" and model is not None and is_masked_lm(model):
        raise TaskError(
            f"task {task.name!r} is a generation task; a masked LM "
            f"({type(model).__name__}) cannot decode answers: use a causal LM"
        )
    rows = rows_of(task, examples) if kind == "classification" else gold_rows(task, examples)
    encode = scorer_for(model).encode if model is not None else encode_rows
    return TaskBatch(kind, encode(tokenizer, rows, max_length))


def batch_loss(model: nn.Module, batch: TaskBatch) -> Tensor:
    """The kind's training loss on `batch`: a scalar tensor (autograd and no_grad alike)."""
    return KIND_LOSSES[batch.kind](model, batch.pairs)


__all__ = [
    "KIND_LOSSES",
    "TaskBatch",
    "batch_loss",
    "candidate_log_likelihoods",
    "candidate_table",
    "classification_loss",
    "gold_rows",
    "make_batch",
    "pair_log_likelihoods",
    "pair_totals",
    "task_kind",
    "teacher_forcing_loss",
    "token_log_probs",
]
