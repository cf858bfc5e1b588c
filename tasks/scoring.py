"""Scoring candidates with a causal LM: the ZO loss, and evaluation.

Each (example, candidate) pair is scored as `prompt tokens + candidate tokens`, and all
sequences of a batch go through the model in one right-padded forward. Two savings:

- Only the hidden states that predict candidate tokens reach the LM head, so the logits
  are [scored positions, vocab] instead of [sequences, length, vocab]: with a 50k-150k
  vocabulary the full logits would be most of a forward's memory and time.
- A one-token candidate is predicted from the prompt alone, so it needs no sequence of
  its own: it is read off a sequence of the same example. An example whose candidates
  are all one token (" terrible" / " great" for most real tokenizers) costs one sequence,
  not one per candidate, which halves the forward passes a ZO step spends on SST-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Example, Task, TaskError


@dataclass(frozen=True)
class CandidateBatch:
    """B examples, their P (example, candidate) pairs, in N <= P sequences.

    Pairs are grouped by example (all candidates of example 0, then of example 1...).
    Token t of a candidate is predicted by the model's output at position t - 1: the Q
    distinct such positions are (`score_rows`, `score_positions`), and each of the K
    scored tokens names its position (`target_slot`), its token and its pair.
    """

    input_ids: Tensor  # [N, L] long, right-padded
    attention_mask: Tensor  # [N, L] long, 1 on real tokens
    score_rows: Tensor  # [Q] long: the sequence of a scored position
    score_positions: Tensor  # [Q] long: the position whose output predicts a target
    target_slot: Tensor  # [K] long: index into the Q scored positions
    target_ids: Tensor  # [K] long: the candidate token predicted there
    target_pair: Tensor  # [K] long: the (example, candidate) pair the token belongs to
    candidate_lengths: Tensor  # [P] long: tokens per candidate (>= 1)
    example_index: Tensor  # [P] long: which example a pair belongs to
    candidate_index: Tensor  # [P] long: which candidate of that example it is
    labels: Tensor  # [B] long: the gold candidate of each example
    num_candidates: Tensor  # [B] long

    @property
    def num_examples(self) -> int:
        return self.labels.numel()

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.example_index.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CandidateBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return replace(self, **moved)


# ---------------------------------------------------------------------------- encoding


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer itself prepends BOS to plain text, else [].

    Prompts and candidates are tokenized without special tokens (some tokenizers also
    append EOS, which would sit between prompt and candidate), so BOS is added by hand,
    exactly when the tokenizer would have added it: Llama and OPT (whose BOS is `</s>`)
    do, Qwen2 and SmolLM2 do not.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            # A list of EOS ids (some chat models) pads with the first; pad ids are masked.
            return int(value[0] if isinstance(value, list | tuple) else value)
    raise TaskError("the tokenizer has neither a pad nor an eos token to pad with")


def encode_candidates(
    tokenizer: Any, task: Task, examples: Sequence[Example], max_length: int = 256
) -> CandidateBatch:
    """Tokenize every (example, candidate) pair into one right-padded CandidateBatch.

    Prompt and candidate are tokenized separately and their ids concatenated, so the
    scored tokens are exactly the candidate's. A prompt too long for `max_length` loses
    tokens from the left (after BOS), once per example so that its longest candidate
    fits; candidates are never cut.
    """
    if not examples:
        raise TaskError("encode_candidates needs at least one example")
    bos = _bos_prefix(tokenizer)
    pad = _pad_id(tokenizer)
    prompts = tokenizer([task.prompt(e) for e in examples], add_special_tokens=False)
    candidate_ids: dict[str, list[int]] = {}  # verbalizers repeat: tokenize each string once

    sequences: list[list[int]] = []
    slots: dict[tuple[int, int], int] = {}  # (row, position) -> index among scored positions
    target_slot: list[int] = []
    target_ids: list[int] = []
    target_pair: list[int] = []
    lengths: list[int] = []
    example_index: list[int] = []
    candidate_index: list[int] = []
    num_candidates: list[int] = []

    def score(row: int, first: int, answer: list[int]) -> None:
        """Targets of the next pair: answer[j] is predicted at position first + j."""
        for j, token in enumerate(answer):
            target_slot.append(slots.setdefault((row, first + j), len(slots)))
            target_ids.append(token)
            target_pair.append(len(lengths))

    for b, (example, prompt) in enumerate(zip(examples, prompts["input_ids"], strict=True)):
        candidates = task.candidates(example)
        if not candidates:
            raise TaskError(f"example {example.uid!r} has no candidates")
        if not 0 <= example.label < len(candidates):
            raise TaskError(
                f"example {example.uid!r}: label {example.label} but {len(candidates)} candidates"
            )
        num_candidates.append(len(candidates))
        answers = []
        for candidate in candidates:
            if candidate not in candidate_ids:
                ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise TaskError(f"candidate {candidate!r} tokenizes to no tokens")
                candidate_ids[candidate] = ids
            answers.append(candidate_ids[candidate])
        # One cut per example, sized for its longest candidate: every candidate is then
        # scored after the same context, so their scores stay comparable.
        longest = max(len(answer) for answer in answers)
        room = max_length - len(bos) - longest
        # At least one context token must precede a candidate to predict its first token.
        if room < (0 if bos else 1):
            raise TaskError(
                f"example {example.uid!r}: a candidate is {longest} tokens, so "
                f"max_length={max_length} leaves no room for the prompt"
            )
        context = bos + prompt[max(0, len(prompt) - room) :]
        if not context:
            raise TaskError(f"example {example.uid!r}: empty prompt and no BOS token")
        first = len(context) - 1  # the position that predicts a candidate's first token
        # A sequence per multi-token candidate holds its first len - 1 tokens (the last is
        # predicted, never read). One-token candidates need only the context, which every
        # sequence of this example starts with: they ride on the first one, or on a
        # context-only sequence when no candidate is longer than one token.
        row_of: dict[int, int] = {}
        for c, answer in enumerate(answers):
            if len(answer) > 1:
                row_of[c] = len(sequences)
                sequences.append(context + answer[:-1])
        if not row_of:  # every candidate is one token
            sequences.append(list(context))
        host = min(row_of.values(), default=len(sequences) - 1)
        for c, answer in enumerate(answers):
            score(row_of.get(c, host), first, answer)
            lengths.append(len(answer))
            example_index.append(b)
            candidate_index.append(c)

    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[i, : len(sequence)] = 1

    def long(values: Sequence[int]) -> Tensor:
        return torch.tensor(list(values), dtype=torch.long)

    return CandidateBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        score_rows=long([row for row, _ in slots]),
        score_positions=long([position for _, position in slots]),
        target_slot=long(target_slot),
        target_ids=long(target_ids),
        target_pair=long(target_pair),
        candidate_lengths=long(lengths),
        example_index=long(example_index),
        candidate_index=long(candidate_index),
        labels=long([e.label for e in examples]),
        num_candidates=long(num_candidates),
    )


# ----------------------------------------------------------------------------- scoring


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer without its LM head, and the head.

    `base_model` is the backbone of every transformers *ForCausalLM (LlamaModel, OPTModel
    (its decoder applies the final layer norm), Qwen2Model, ...). A PEFT wrapper is looked
    through with `get_base_model()`: the adapters are injected into the wrapped model's
    layers, and the wrapper's own `base_model` is the LoRA container, not the backbone.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", model)
    if head is None or backbone is model:
        raise TaskError(
            f"{type(model).__name__} is not a causal LM with a separate backbone and LM head "
            "(expected a transformers *ForCausalLM model)"
        )
    return backbone, head


def _softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):  # multimodal configs nest the LM's settings
        config = config.get_text_config()
    return getattr(config, "final_logit_softcapping", None)


def pair_log_likelihoods(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """[P]: the mean log-probability of each pair's candidate tokens (fp32)."""
    backbone, head = _backbone_and_head(model)
    # use_cache=False: a KV cache would be built for nothing and cost memory.
    output = backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    hidden = output[0]  # last_hidden_state, as a ModelOutput or a tuple
    picked = hidden[batch.score_rows, batch.score_positions]  # [Q, H]
    logits = head(picked).float()  # the head runs in the model's dtype, as in forward()
    cap = _softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    log_probs = logits.log_softmax(dim=-1)  # [Q, V]
    token_scores = log_probs[batch.target_slot, batch.target_ids]  # [K]
    totals = token_scores.new_zeros(batch.num_pairs).index_add(0, batch.target_pair, token_scores)
    return totals / batch.candidate_lengths.to(totals.dtype)


def candidate_log_likelihoods(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """[B, C_max]: length-normalised log-likelihood per candidate; -inf where none."""
    scores = pair_log_likelihoods(model, batch)
    max_candidates = int(batch.num_candidates.max())
    table = scores.new_full((batch.num_examples, max_candidates), float("-inf"))
    # Out of place, so autograd sees it (first-order baselines differentiate this).
    return table.index_put((batch.example_index, batch.candidate_index), scores)


def classification_loss(model: nn.Module, batch: CandidateBatch) -> Tensor:
    """Mean over examples of -log softmax(candidate scores)[gold]: a scalar tensor.

    Works under `torch.no_grad()` (ZO closures) and with autograd alike; the -inf padding
    gets zero probability and zero gradient.
    """
    return F.cross_entropy(candidate_log_likelihoods(model, batch), batch.labels)


# -------------------------------------------------------------------------- evaluation


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)  # transformers models know theirs
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _scores(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Candidate scores and labels per batch, in eval mode, restoring every module's mode."""
    if batch_size < 1:
        raise TaskError(f"batch_size must be >= 1, got {batch_size}")
    modes = [(module, module.training) for module in model.modules()]
    device = _model_device(model)
    scores: list[Tensor] = []
    labels: list[Tensor] = []
    model.eval()  # dropout off: evaluation must be a function of the weights
    try:
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = encode_candidates(tokenizer, task, chunk, max_length).to(device)
                scores.append(candidate_log_likelihoods(model, batch).cpu())
                labels.append(batch.labels.cpu())
    finally:
        # Per module, not model.train(mode): a model partly in eval mode stays that way.
        for module, training in modes:
            module.training = training
    return scores, labels


def predict(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_length: int = 256,
) -> list[int]:
    """The index of the best-scoring candidate per example."""
    scores, _ = _scores(model, tokenizer, task, examples, batch_size, max_length)
    return [int(i) for s in scores for i in s.argmax(dim=1).tolist()]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_length: int = 256,
) -> dict[str, float]:
    """`accuracy`, mean `loss` (the training loss) and `num_examples` over `examples`."""
    if not examples:
        raise TaskError(f"task {task.name!r}: no examples to evaluate")
    scores, labels = _scores(model, tokenizer, task, examples, batch_size, max_length)
    correct = sum(int((s.argmax(dim=1) == y).sum()) for s, y in zip(scores, labels, strict=True))
    loss = sum(
        float(F.cross_entropy(s, y, reduction="sum")) for s, y in zip(scores, labels, strict=True)
    )
    return {
        "accuracy": correct / len(examples),
        "loss": loss / len(examples),
        "num_examples": len(examples),
    }
