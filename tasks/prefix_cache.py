"""Evaluation of candidates after a shared prompt: the prompt runs once, its KV cache serves
every candidate.

The per-sequence layout (`tasks.scoring.encode_rows`) gives each multi-token candidate a
sequence of its own, `context + candidate[:-1]`, so a row with m such candidates runs its
prompt m times. COPA's and ReCoRD's candidates are whole sentences after a long prompt:
most of their forward is the same prompt again. Here a batch runs in two passes:

1. the prompt pass: each row's context (BOS + prompt, cut exactly as `encode_rows` cuts
   it), left-padded, once. Its last position predicts every candidate's first token,
   and its KV cache is kept.
2. the continuation pass: one right-padded sequence per multi-token candidate, its
   tokens but the last, read after its row's cache (`rows_of_cache`: each layer attends
   its rows of the prompt's keys and values, selected per candidate as the layer runs).
   Position ids continue each row's prompt; the attention mask is the row's prompt
   mask followed by the candidate's.

The scored token ids, their positions and their contexts are those of `encode_rows`, so
the scores equal the per-sequence ones up to floating-point rounding (tested). Only the
scored positions reach the LM head, as elsewhere. Evaluation only: the cache is built
under the caller's no_grad/inference mode; training losses keep the per-sequence layout.

Which batches take this path (`tasks.scoring.score_rows`, `prefix_cache=`):

- never: the per-sequence layout, always.
- always / auto: wherever the model can use it (`Scorer.prefix_cache`: a causal LM
  whose backbone takes a KV cache (`tasks.kv_cache`) and `position_ids`; never a masked
  LM) and no row of the batch has a prompt per candidate (partial scoring, WinoGrande).
  A model that cannot is an error under "always" naming its class and the reason; under
  "auto" it is logged once per model class and process (WARNING for a causal LM, which
  loses a fast path; INFO for a masked LM, which never has one), as is the path taken
  and the per-sequence layout of partial-scoring batches (INFO, logger
  `tasks.prefix_cache`). "auto"
  also requires that the two passes together run at most `MAX_SLOT_RATIO` of the
  token slots (padding included) the per-sequence layout runs: a forward's cost grows
  with its token slots, and the second pass (its own read of every weight) and the
  per-layer selection of the prompt's keys and values must be paid for. A row with m > 1 multi-token candidates saves m - 1
  runs of its prompt; one-token candidates (verbalizers) save nothing, so
  classification stays on the one-pass layout.

`evaluate` and `predict` use "auto"; `score_rows` and `EvalSettings` default to "never",
so metric objectives during training (`tasks.objectives`) keep their exact scores.

Each batch is one prompt pass, not one per example: on one CPU thread a forward of
SmolLM2-135M costs ~40 ms before its first token (reading the weights), so grouping by
example (no prompt padding, one pass per example) measured 2-4x slower than the
left-padded batch on COPA's and ReCoRD's fixtures.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from transformers import cache_utils

from tasks.base import TaskError
from tasks.kv_cache import cache_keyword, returned_cache, why_no_kv_cache
from tasks.scoring import (
    ScoringRow,
    _tokenized_candidates,
    _unwrapped,
    backbone_and_head,
    bos_prefix,
    candidate_table,
    cut_context,
    head_logits,
    model_device,
    pad_id,
    pair_totals,
    prompt_room,
    scorer_for,
)

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


MAX_SLOT_RATIO = 0.8
""""auto": the largest share of the per-sequence layout's token slots the two passes may run."""


@dataclass(frozen=True)
class PrefixBatch:
    """B rows' contexts, their N multi-token candidates' continuations, the P pairs.

    Scored positions are Q slots: slot b < B is the last prompt position of row b; slot
    B + q is continuation position (`score_rows[q]`, `score_positions[q]`). The pair
    fields (target_* to num_candidates) mean what they mean in a CandidateBatch.
    """

    prompt_ids: Tensor  # [B, L] long, left-padded contexts
    prompt_mask: Tensor  # [B, L] long, 1 on real tokens
    continuation_ids: Tensor  # [N, T] long, right-padded: a candidate's tokens but its last
    continuation_mask: Tensor  # [N, T] long
    continuation_row: Tensor  # [N] long: the row whose prompt a continuation follows
    score_rows: Tensor  # [Q - B] long: the continuation of a scored position
    score_positions: Tensor  # [Q - B] long: its position in the continuation
    target_slot: Tensor  # [K] long: index into the Q scored positions
    target_ids: Tensor  # [K] long
    target_pair: Tensor  # [K] long
    candidate_lengths: Tensor  # [P] long
    example_index: Tensor  # [P] long
    candidate_index: Tensor  # [P] long
    labels: Tensor  # [B] long
    num_candidates: Tensor  # [B] long

    @property
    def num_examples(self) -> int:
        return self.labels.numel()

    @property
    def num_pairs(self) -> int:
        return self.example_index.numel()

    @property
    def token_slots(self) -> int:
        """Token positions the two passes run, padding included."""
        return self.prompt_ids.numel() + self.continuation_ids.numel()

    @property
    def per_sequence_slots(self) -> int:
        """Token positions `encode_rows` runs for the same rows: a sequence per multi-token
        candidate (context + its tokens but the last), or the context alone for a row
        with none, all padded to the longest."""
        contexts = self.prompt_mask.sum(dim=1)
        ends = contexts[self.continuation_row] + self.continuation_mask.sum(dim=1)
        alone = torch.bincount(self.continuation_row, minlength=self.num_examples) == 0
        longest = int(torch.cat([ends, contexts[alone]]).max())
        return (ends.numel() + int(alone.sum())) * longest

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PrefixBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return replace(self, **moved)


def _long(values: Sequence[int]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def _padded(sequences: Sequence[list[int]], pad: int, left: bool) -> tuple[Tensor, Tensor]:
    width = max((len(sequence) for sequence in sequences), default=0)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[i, span] = torch.tensor(sequence, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def encode_prefix_rows(
    tokenizer: Any, rows: Sequence[ScoringRow], max_length: int = 256
) -> PrefixBatch:
    """The two-pass layout of `rows`; their contexts are cut as `encode_rows` cuts them.

    Rows with a prompt per candidate (partial scoring) have no shared prompt: an error.
    """
    if not rows:
        raise TaskError("encoding needs at least one example")
    shared = [row.uid for row in rows if row.prompts is not None]
    if shared:
        raise TaskError(
            f"examples {shared} score each candidate after a prompt of its own (partial "
            "scoring); the prefix cache needs one prompt per example: use prefix_cache='never'"
        )
    bos = bos_prefix(tokenizer)
    answers_of = _tokenized_candidates(tokenizer, rows)
    texts = list(dict.fromkeys(row.prompt for row in rows))
    prompt_ids = dict(
        zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True)
    )
    contexts: list[list[int]] = []
    continuations: list[list[int]] = []
    continuation_row: list[int] = []
    target_slot: list[int] = []
    target_ids: list[int] = []
    target_pair: list[int] = []
    pairs: list[tuple[int, int, int]] = []  # (row, candidate, length)
    slots = len(rows)  # slots 0..B-1 are the prompts' last positions
    for b, (row, answers) in enumerate(zip(rows, answers_of, strict=True)):
        room = prompt_room(row, answers, bos, max_length)
        contexts.append(cut_context(row, bos, prompt_ids[row.prompt], room))
        for c, answer in enumerate(answers):
            pair = len(pairs)
            pairs.append((b, c, len(answer)))
            target_slot.append(b)
            target_ids.append(answer[0])
            target_pair.append(pair)
            if len(answer) > 1:
                continuation_row.append(b)
                continuations.append(answer[:-1])
                for token in answer[1:]:
                    target_slot.append(slots)
                    target_ids.append(token)
                    target_pair.append(pair)
                    slots += 1
    pad = pad_id(tokenizer)
    prompt, prompt_mask = _padded(contexts, pad, left=True)
    continuation, continuation_mask = _padded(continuations, pad, left=False)
    score_rows = [n for n, tokens in enumerate(continuations) for _ in tokens]
    score_positions = [j for tokens in continuations for j in range(len(tokens))]
    return PrefixBatch(
        prompt_ids=prompt,
        prompt_mask=prompt_mask,
        continuation_ids=continuation,
        continuation_mask=continuation_mask,
        continuation_row=_long(continuation_row),
        score_rows=_long(score_rows),
        score_positions=_long(score_positions),
        target_slot=_long(target_slot),
        target_ids=_long(target_ids),
        target_pair=_long(target_pair),
        candidate_lengths=_long([length for _, _, length in pairs]),
        example_index=_long([b for b, _, _ in pairs]),
        candidate_index=_long([c for _, c, _ in pairs]),
        labels=_long([row.label for row in rows]),
        num_candidates=_long([len(row.candidates) for row in rows]),
    )


def prefix_pays(batch: PrefixBatch) -> bool:
    """The "auto" rule (module doc): the two passes run few enough token slots."""
    return batch.token_slots <= MAX_SLOT_RATIO * batch.per_sequence_slots


# Layers whose `update` returns the stored states followed by the new ones (the same in
# every supported transformers release): a read-only view of selected rows behaves the same
# for one forward. Looked up by name, so that a release without one copies instead.
_VIEWABLE_LAYERS = tuple(
    getattr(cache_utils, name)
    for name in ("DynamicLayer", "DynamicSlidingWindowLayer")
    if hasattr(cache_utils, name)
)


def _selected_update(
    layer: Any, rows: Tensor, keys: Tensor, values: Tensor, *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    layer.read = True  # the forward did reach the cache (checked by `_check_continued`)
    return (
        torch.cat([layer.keys[rows], keys], dim=-2),
        torch.cat([layer.values[rows], values], dim=-2),
    )


def rows_of_cache(cache: Any, rows: Tensor) -> Any:
    """`cache` for one more forward whose batch row n continues the cache's row `rows[n]`.

    Dynamic layers are not copied: a shallow copy of each layer answers `update` with its
    selected rows followed by the new states and stores nothing, so the rows' expanded
    keys and values exist for one layer at a time, not for all of them at once as with
    `Cache.batch_select_indices` (for a 7B model, 0.5 MB per token and layer stack: a
    batch of ReCoRD rows x entities x 256 tokens would be tens of GB). Other layer kinds
    get `batch_select_indices`, a copy (logged once: it costs that memory).
    """
    layers = getattr(cache, "layers", [])
    others = sorted(
        {
            type(layer).__name__
            for layer in layers
            if type(layer) not in _VIEWABLE_LAYERS
            or not layer.is_initialized
            or getattr(layer, "record_past", False)
        }
    )
    if others or not layers:
        _log_once(
            logging.INFO,
            f"prefix cache: {type(cache).__name__} layers {others} have no row view; the "
            "prompt's keys and values are copied per candidate (batch_select_indices)",
        )
        cache.batch_select_indices(rows)
        return cache
    view = copy.copy(cache)
    view.layers = []
    for layer in layers:
        selected = copy.copy(layer)  # same class and state: masks and lengths read alike
        selected.read = False
        selected.update = partial(_selected_update, selected, rows)
        view.layers.append(selected)
    return view


def _check_continued(backbone: nn.Module, cache: Any, view: Any, cached_before: int) -> None:
    """The continuation pass read the prompt's cache: a backbone that took it into
    `**kwargs` instead would score the candidates without their prompt."""
    if view is cache:  # rows copied in place: the cache grew by the continuation
        continued = cache.get_seq_length() > cached_before
    else:
        continued = any(layer.read for layer in view.layers)
    if not continued:
        raise TaskError(
            f"{type(backbone).__name__} ignored the KV cache passed as "
            f"`{cache_keyword(backbone)}`: the candidates would be scored without their "
            "prompt; evaluate with prefix_cache='never'"
        )


def prefix_token_log_probs(model: nn.Module, batch: PrefixBatch) -> Tensor:
    """[K]: the fp32 log-probability of each scored token, the prompt run once per row."""
    backbone, head = backbone_and_head(model)
    reason = why_no_kv_cache(backbone)
    if reason is not None:
        raise TaskError(f"{reason}; evaluate with prefix_cache='never'")
    positions = (batch.prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    output = backbone(
        input_ids=batch.prompt_ids,
        attention_mask=batch.prompt_mask,
        position_ids=positions,
        use_cache=True,
    )
    picked = [output[0][:, -1]]  # left padding: every row's last prompt token is at -1
    if batch.continuation_ids.numel():
        rows = batch.continuation_row
        cache = returned_cache(backbone, output)
        cached_before = cache.get_seq_length()
        view = rows_of_cache(cache, rows)
        width = batch.continuation_ids.shape[1]
        steps = torch.arange(width, device=positions.device)
        hidden = backbone(
            input_ids=batch.continuation_ids,
            attention_mask=torch.cat([batch.prompt_mask[rows], batch.continuation_mask], dim=1),
            position_ids=batch.prompt_mask.sum(dim=1)[rows, None] + steps,
            use_cache=True,
            **{cache_keyword(backbone): view},
        )[0]
        _check_continued(backbone, cache, view, cached_before)
        picked.append(hidden[batch.score_rows, batch.score_positions])
    log_probs = head_logits(model, head, torch.cat(picked)).log_softmax(dim=-1)  # [Q, V]
    return log_probs[batch.target_slot, batch.target_ids]


def prefix_candidate_log_likelihoods(
    model: nn.Module, batch: PrefixBatch, normalize: bool = True
) -> Tensor:
    """[B, C_max]: as `tasks.scoring.candidate_log_likelihoods`, through the prompt's cache."""
    return candidate_table(
        batch, pair_totals(batch, prefix_token_log_probs(model, batch), normalize)
    )


def use_prefix_cache(model: nn.Module, mode: str) -> bool:
    """Whether `score_rows` may take this path for `model` in `mode` ("auto", "always",
    "never"); under "always" a model that cannot is an error, under "auto" a log line."""
    if mode == "never":
        return False
    scorer = scorer_for(model)
    name = type(_unwrapped(model)).__name__
    if scorer.prefix_cache is None:
        reason, level = (
            "a masked LM reads each prompt with its candidates in one pass",
            logging.INFO,
        )
    else:
        reason, level = scorer.prefix_cache(model), logging.WARNING
    if reason is None:
        _log_once(
            logging.INFO,
            f"prefix_cache={mode!r}: {name} runs each shared prompt once and scores the "
            "candidates after its KV cache"
            + (" where that pays (tasks.prefix_cache)" if mode == "auto" else ""),
        )
        return True
    if mode == "always":
        raise TaskError(
            f"prefix_cache='always': {name} cannot score candidates after a shared "
            f"prompt's KV cache: {reason}; use prefix_cache='auto' or 'never'"
        )
    _log_once(level, f"prefix_cache='auto': {name} scores every batch in one pass: {reason}")
    return False


def prefix_table(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[ScoringRow],
    max_length: int,
    normalize: bool,
    mode: str,
) -> Tensor | None:
    """The rows' candidate table through the prompt's KV cache, or None where a row has
    a prompt per candidate or "auto" finds that the cache does not pay."""
    if any(row.prompts is not None for row in rows):
        _log_once(
            logging.INFO,
            "prefix cache: batches with a prompt per candidate (partial scoring) have no "
            "shared prompt and use the per-sequence layout",
        )
        return None
    batch = encode_prefix_rows(tokenizer, rows, max_length)
    if mode == "auto" and not prefix_pays(batch):
        return None
    return prefix_candidate_log_likelihoods(model, batch.to(model_device(model)), normalize)


__all__ = [
    "MAX_SLOT_RATIO",
    "PrefixBatch",
    "encode_prefix_rows",
    "prefix_candidate_log_likelihoods",
    "prefix_pays",
    "prefix_table",
    "prefix_token_log_probs",
    "use_prefix_cache",
]
